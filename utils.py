"""Small shared helpers: seeding, devices, metric averaging, early stopping, atomic checkpoints, left padding."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import statistics
import sys
import tempfile
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

LOG = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The torch, CUDA, numpy and python RNG states, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={name!r} was asked for but CUDA is not available here; use device=cpu (or device=auto)."
        )
    return torch.device(name)


def to_device(batch, device):
    """Move every tensor of a (nested) batch dict to ``device``; other values are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def peak_memory_mb() -> Dict[str, float]:
    """Peak memory of this process so far: resident set size (CPU), and CUDA allocations when a GPU was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": rss / (1024 * 1024 if sys.platform == "darwin" else 1024)}  # bytes on macOS, KiB on Linux
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def all_finite(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """No tensor (None: skipped) holds an inf or a NaN. One sum per tensor, read once: a sum is non-finite when a
    term is (or when finite terms overflow float32's 3e38 together, values no training step should apply either)."""
    sums = [t.sum(dtype=torch.float32) for t in tensors if t is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def model_inputs(batch: dict) -> dict:
    """The tensors a model's forward takes: everything but the labels."""
    return {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}


class StatAverager:
    """Collects per-step metric dicts and summarises them.

    Plain metrics are averaged over steps; ``time/*`` metrics get their median; perplexities are
    token-weighted: exp(sum of nll over all tokens / number of tokens), from the ``nll_sum/*`` and
    ``n_tokens/*`` entries that the edit step records.
    """

    def __init__(self, suffix: str = ""):
        self.suffix = suffix
        self.values: Dict[str, List[float]] = defaultdict(list)

    def add(self, info: Dict[str, float]) -> None:
        for k, v in info.items():
            self.values[k].append(float(v))

    def __len__(self):
        return max((len(v) for v in self.values.values()), default=0)

    def summary(self) -> Dict[str, float]:
        out = {}
        for k, vals in self.values.items():
            if k.startswith(("nll_sum/", "n_tokens/")):
                continue
            out[k] = statistics.median(vals) if k.startswith("time/") else sum(vals) / len(vals)
        for which in ("pre", "post"):
            sums, counts = self.values.get(f"nll_sum/{which}"), self.values.get(f"n_tokens/{which}")
            if sums and counts and sum(counts) > 0:
                out[f"perplexity/{which}"] = math.exp(sum(sums) / sum(counts))
        if "perplexity/pre" in out and "perplexity/post" in out:
            out["perplexity/drawdown"] = out["perplexity/post"] - out["perplexity/pre"]
        for acc in ("acc", "acc_tok"):
            if f"{acc}/pre" in out and f"{acc}/post" in out:
                out[f"{acc}/drawdown"] = out[f"{acc}/pre"] - out[f"{acc}/post"]
        return {k + self.suffix: v for k, v in out.items()}


class EarlyStopper:
    """Tracks the best value of one metric; lower is better unless the key names an accuracy."""

    def __init__(self, patience: int, key: str):
        self.patience = patience
        self.key = key
        self.higher_is_better = "acc" in key
        self.best_value: Optional[float] = None
        self.best_step: int = -1
        self.current_step: int = 0

    def update(self, step: int, stats: Dict[str, float]) -> bool:
        """Record a validation; True if it is a new best."""
        if self.key not in stats:
            raise KeyError(
                f"early_stop_key={self.key!r} is not among the validation metrics; valid keys: "
                f"{', '.join(sorted(stats))}"
            )
        self.current_step = step
        value = stats[self.key]
        better = self.best_value is None or (
            value > self.best_value if self.higher_is_better else value < self.best_value
        )
        if better:
            self.best_value, self.best_step = value, step
        return better

    def should_stop(self) -> bool:
        return self.best_step >= 0 and self.current_step - self.best_step >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_step": self.best_step, "current_step": self.current_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.current_step = state["current_step"]


def _publish_temp_file(tmp: str) -> None:
    """Give a temporary file from ``tempfile.mkstemp`` (private: 0600) the mode an ordinary new file gets (0666 less
    the umask), before it is renamed into place, so that results and checkpoints are readable as any output is."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Write ``path`` through ``write(tmp)``, which writes a temporary file in the same directory, then a rename.

    A crash or a full disk during the write leaves the previous file at ``path`` intact (and no temporary file);
    the file gets the mode of any new file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _publish_temp_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    """Write ``obj`` to ``path`` with :func:`atomic_write`, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, suffix=".pt")


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(obj, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def flatten_dict(d, prefix: str = "") -> dict:
    """A nested dict as one level of dotted keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Padded ids (``value`` after each row's end, or before its start with ``left``: the layout for generating
    several prompts' continuations at once) and their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, r in enumerate(rows):
        if len(r):
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            ids[n, cols] = torch.tensor(list(r), dtype=torch.long)
            mask[n, cols] = 1
    return ids, mask
