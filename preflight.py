"""What a command will write and where it will run, checked before it loads a model or computes anything, so that a
mistyped path or device costs a second and not the hour of compute before it: each output file's and directory's
place, outputs that already exist (never replaced without ``--overwrite``), the device."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch

from errors import DeviceError, EditRequestError, OutputExistsError, OutputPathError

DEVICES = "cpu, cuda, cuda:N, mps or auto"
# Edit prompts are sentences (CounterFact's are about 10 tokens); one of thousands of tokens is most likely a pasted
# document, and costs minutes per edit on a CPU: warned about above this (``--max-prompt-tokens``).
MAX_PROMPT_TOKENS = 256


def check_device(name: str, flag: str = "--device") -> None:
    """Refuse a device this machine does not have (CUDA without a GPU, a GPU index beyond the count) or a name
    torch does not know."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{flag} {name}: not a device name; use {DEVICES}.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise DeviceError(
                f"{flag} {name}: CUDA is not available on this machine ({why}); use --device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}."
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{flag} {name}: MPS is not available on this machine; use --device cpu or auto.")
    elif device.type != "cpu":
        raise DeviceError(f"{flag} {name}: this program runs on {DEVICES}.")


def _place(path: str, flag: str) -> str:
    """The absolute path of an output, whose directory must exist and be writable."""
    full = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise OutputPathError(
            f"{flag} {path}: the directory {parent} does not exist; create it first (mkdir -p {parent}) or choose "
            f"another place."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: the directory {parent} is not writable; choose another place.")
    return full


def check_output_file(path: Optional[str], flag: str, overwrite: bool) -> None:
    """An output file: its directory exists and is writable; it is not a directory; it does not exist yet unless
    ``overwrite``."""
    if not path:
        return
    full = _place(path, flag)
    if os.path.isdir(full):
        raise OutputPathError(f"{flag} {path}: is a directory; give a file name.")
    if os.path.exists(full) and not overwrite:
        raise OutputExistsError(
            f"{flag} {path}: the file exists; pass --overwrite to replace it, or choose another name."
        )


def check_output_dir(path: Optional[str], flag: str, overwrite: bool, writes: Optional[Sequence[str]] = None) -> None:
    """An output directory (created if missing): its parent exists and is writable; it is not a file; unless
    ``overwrite``, it is empty (``writes=None``) or holds none of the files ``writes`` names (what the command will
    write into it; ``()``: a command that adds files without replacing any)."""
    if not path:
        return
    full = _place(path, flag)
    if os.path.exists(full) and not os.path.isdir(full):
        raise OutputExistsError(f"{flag} {path}: exists and is a file, not a directory; choose another name.")
    if not os.path.isdir(full) or overwrite:
        return
    present = (
        sorted(os.listdir(full)) if writes is None else [w for w in writes if os.path.exists(os.path.join(full, w))]
    )
    if present:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        what = "is not empty" if writes is None else "holds results of an earlier run"
        raise OutputExistsError(
            f"{flag} {path}: {what} ({shown}); pass --overwrite to replace them, or choose another directory."
        )


def check_prompt_lengths(
    texts: Sequence[Tuple[str, int]], context: Optional[int], limit: int, where: str, flag: str = "--max-prompt-tokens"
) -> List[str]:
    """``texts``: (what it is, its tokens with its target, as the model reads them) of the request or case
    ``where``. One longer than the model's ``context`` (None: unknown) is refused, as the model cannot read it whole;
    a warning for each one longer than ``limit``."""
    warnings = []
    for what, n in texts:
        if context is not None and n > context:
            raise EditRequestError(
                f"{where}: {what} is {n} tokens with its target, longer than the model's context of {context} "
                f"tokens; shorten it."
            )
        if n > limit:
            warnings.append(f"{what} is {n} tokens with its target, above {flag} {limit} (slow: a whole document?)")
    return warnings
