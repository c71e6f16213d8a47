"""Whether the HuggingFace hub can be reached: offline mode, and one short probe per process.

huggingface_hub (under transformers and datasets) retries a failed request for about 25 s, printing a line per
try; the models and the data sets ask :func:`hub_unreachable_reason` first, so that an offline machine fails at
once with one line that says what to do.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, Optional

from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import get_session

PROBE_TIMEOUT = 5.0
_PROBED: Dict[str, Optional[str]] = {}  # endpoint -> the reason it could not be reached (None: it answered)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import)."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        return bool(hf_constants.HF_HUB_OFFLINE)
    except Exception:
        return False


def hub_unreachable_reason() -> Optional[str]:
    """``None`` if the HuggingFace hub answers, else a one-line reason. Asked once per process and endpoint."""
    if offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    endpoint = hf_constants.ENDPOINT
    if endpoint in _PROBED:
        return _PROBED[endpoint]
    result: list = ["no answer within %.0f s" % (2 * PROBE_TIMEOUT)]

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=PROBE_TIMEOUT)  # any HTTP answer means reachable
            result[0] = None
        except Exception as e:
            text = " ".join(str(e).split()) or type(e).__name__
            text = text if type(e).__name__ in text else f"{type(e).__name__}: {text}"
            result[0] = text if len(text) <= 160 else text[:157] + "..."

    # Name resolution ignores the timeout, so the probe runs in a thread that is abandoned if it hangs.
    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(2 * PROBE_TIMEOUT)
    _PROBED[endpoint] = result[0]
    return result[0]
