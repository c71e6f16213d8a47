"""Editor checkpoints: where they are, how they are written and read, and whether they fit a base model.

A checkpoint is a ``torch.save`` dict with the editor's state dict under ``"editor"`` and, under ``"meta"``, a JSON
string: the model name, the edited weights (``inner_params``), the editor (``alg``), the identity of the base model
it was trained on (:func:`base_model_identity`) and the whole run configuration. ``checkpoints/best.pt`` holds the
best editor of a run (what ``archive=`` and ``python -m edit`` load); ``checkpoints/last.pt`` the whole training
state (what ``resume=`` continues from). Training (``trainer.py``) and editing (``edit.py``) both go through here.

Files are written atomically (a temporary file and a rename: a crash leaves the previous one intact) and read
with ``weights_only=True``, so loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

import distributed
from config_schema import merge_saved_config
from errors import CheckpointError, CheckpointWriteError, InnerParamsError
from models import check_inner_params
from utils import atomic_torch_save, flatten_dict

LOG = logging.getLogger(__name__)

BEST_NAME = "best.pt"  # the editor with the best validation score: what archive= loads
LAST_NAME = "last.pt"  # the full training state at the latest checkpoint: what resume= continues from


# -- where ----------------------------------------------------------------------------------------------------
def checkpoint_path(archive: str, name: str = BEST_NAME, key: str = "archive") -> str:
    """``archive`` may be a checkpoint file or a run directory (its checkpoints/<name>). A path that holds none says
    what to pass instead."""
    path = os.path.expanduser(archive)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{key}={archive!r}: no checkpoint found at {path}. {_missing_hint(archive, name, key)}")
    return path


def _missing_hint(archive: str, name: str, key: str) -> str:
    """What to pass instead of ``archive``, which holds no checkpoint ``name``."""
    given = os.path.expanduser(archive)
    if os.path.isfile(os.path.join(given, name)):  # the checkpoints/ folder itself
        return f"Pass the run directory {os.path.dirname(os.path.abspath(given))} or {os.path.join(given, name)}."
    last = os.path.join(given, "checkpoints", LAST_NAME)
    if name == BEST_NAME and os.path.isfile(last):
        return (
            f"The run stopped before its first validation wrote {name}: continue its training with "
            f"python -m run resume={archive} (or pass {last}, the editor as it was then)."
        )
    if os.path.isdir(given):
        runs = sorted(d for d in os.listdir(given) if os.path.isfile(os.path.join(given, d, "checkpoints", name)))
        if runs:
            shown = ", ".join(os.path.join(archive, d) for d in runs[:3]) + (", ..." if len(runs) > 3 else "")
            return f"It holds the training runs {shown}: pass one of them."
        return (
            f"{archive} is a directory without checkpoints: pass the run directory of a training run or its "
            f"checkpoints/{name}."
        )
    if not os.path.exists(given):
        return f"No such file or directory: pass the run directory of a training run or its checkpoints/{name}."
    return f"Pass a checkpoint file or the run directory of a training run (it holds checkpoints/{name})."


def resume_run_dir(resume: str) -> str:
    """The run directory of ``resume=`` (a run directory, or a checkpoint file inside its checkpoints/)."""
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(path)
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


# -- which base model -----------------------------------------------------------------------------------------
def weight_identity(model: torch.nn.Module, names: Iterable[str]) -> Dict[str, dict]:
    """Shape, dtype and a hash of the values of each named weight."""
    weights = {}
    for name in names:
        p = model.get_parameter(name).detach()
        data = p.to("cpu", torch.float32).contiguous().numpy().tobytes()
        weights[name] = {
            "shape": list(p.shape),
            "dtype": str(p.dtype).replace("torch.", ""),
            "sha256": hashlib.sha256(data).hexdigest()[:16],
        }
    return weights


def base_model_identity(model: torch.nn.Module, inner_params) -> dict:
    """What identifies the base model for an editor: its class, size, and the edited weights' shapes and hashes."""
    identity = {
        "class": type(model).__name__,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "edited_weights": weight_identity(model, inner_params),
    }
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)  # the hub commit it was loaded from
    if isinstance(revision, str) and revision:
        identity["revision"] = revision
    return identity


@dataclass
class IdentityDiff:
    """How a base model differs from the one an editor or a patch was made for."""

    cls: Optional[Tuple[str, str]] = None  # (made for, given), when the classes differ
    shapes: List[Tuple[str, list, list]] = field(default_factory=list)  # (weight, made for, given)
    values: List[str] = field(default_factory=list)  # weights of the same shape whose values differ


def identity_diff(model: torch.nn.Module, made_for: dict, ours: Optional[Dict[str, dict]] = None) -> IdentityDiff:
    """Compare ``model`` with the identity ``made_for`` (:func:`base_model_identity`) over the weights both have.

    ``ours``: the model's :func:`weight_identity` of those weights, when already computed."""
    diff = IdentityDiff()
    cls = type(model).__name__
    if made_for.get("class") and made_for["class"] != cls:
        diff.cls = (made_for["class"], cls)
    recorded = made_for.get("edited_weights", {})
    if ours is None:
        params = dict(model.named_parameters())
        ours = weight_identity(model, [n for n in recorded if n in params])
    for name, info in recorded.items():
        now = ours.get(name)
        if now is None:
            continue
        if now["shape"] != info["shape"]:
            diff.shapes.append((name, info["shape"], now["shape"]))
        elif now["sha256"] != info["sha256"]:
            diff.values.append(name)
    return diff


# Config keys (prefixes) whose change on resume cannot affect the training itself.
_RESUME_FREE_KEYS = (
    "resume",
    "archive",
    "silent",
    "wandb",
    "eval",
    "results_dir",
    "cache_dir",
    "device",
    "max_time",
    "dist",
)


def changed_settings(meta: dict, config) -> List[str]:
    """The settings of ``config`` that differ from those a checkpoint was written with (``meta``), as
    "key: old -> new", leaving out the keys that cannot affect training (output places, logging, time limits)."""
    # read as the schema reads it now: keys renamed since compare under their new names
    saved = flatten_dict(OmegaConf.to_container(merge_saved_config(meta.get("config", {})), resolve=True))
    now = flatten_dict(OmegaConf.to_container(config, resolve=True))
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and not k.startswith(_RESUME_FREE_KEYS)
    ]


def load_editor_state(editor: torch.nn.Module, state: dict, path: str) -> None:
    """Load a checkpoint's editor state into ``editor``; a state of another shape raises a CheckpointError."""
    try:
        editor.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(
            f"{path}: the editor it holds does not fit this configuration and model (were the editor's settings, "
            f"e.g. its rank or sharing, changed?): {str(e).splitlines()[0]}"
        ) from None


def _refuse_other_shapes(diff: IdentityDiff, where: str, given_name: str) -> None:
    """A CheckpointError for edited weights of another shape; a warning for weights of other values."""
    if diff.shapes:
        w, made_for, given = diff.shapes[0]
        raise CheckpointError(
            f"{where}: the editor was trained on a model whose {w} has shape {made_for}; {given_name} has shape "
            f"{given}. An editor only edits the model (architecture and weights) it was trained on."
        )
    for w in diff.values:
        LOG.warning(
            "%s: the edited weight %s differs from the one the editor was trained on (another version or fine-tune "
            "of the model?); edits may not work as validated.",
            where,
            w,
        )


# -- reading --------------------------------------------------------------------------------------------------
def read_checkpoint(path: str, key: str = "archive") -> dict:
    """Load a checkpoint file without executing code: tensors through weights_only, metadata as JSON. A file that
    cannot be read is refused in one line that says what it is (empty, truncated, text, not a checkpoint, holding
    code) and what to do."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, not a checkpoint, or holding code (refused by weights_only)
        raise CheckpointError(f"{key}: {path} could not be read as a checkpoint: {_unreadable(path, e, key)}") from e
    if not isinstance(ckpt, dict) or "editor" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(
            f"{key}: {path} is not an editor checkpoint (no 'editor' and 'meta' entries). Pass the run directory of "
            f"a training run or its checkpoints/{BEST_NAME}."
        )
    try:
        ckpt["meta"] = json.loads(ckpt["meta"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{key}: {path} has unreadable metadata ({e}).") from e
    return ckpt


def _unreadable(path: str, error: Exception, key: str) -> str:
    """Why ``path`` could not be loaded (torch's ``error``, whose own advice, e.g. weights_only=False, is wrong
    here) and what to do, told from the file's first bytes."""
    pass_instead = f"pass the run directory of a training run or its checkpoints/{BEST_NAME}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    if size == 0:
        return f"it is empty (0 bytes): its write or copy never happened; {_redo(path, key)}."
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"it is truncated ({size} bytes, its end is missing: an interrupted copy or write); {_redo(path, key)}."
    if head.startswith(b"PK\x03\x04"):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and found:
            return (
                f"it holds a Python object ({found.group(1)}) that would run code when loaded, so it was not loaded "
                f"and nothing in it was run; only checkpoints that python -m run wrote are read: {pass_instead}."
            )
        return f"it is corrupted ({type(error).__name__}); nothing in it was run; {_redo(path, key)}."
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        start = " ".join(text.split())[:40]
        return f"it is a text file (it starts with {start!r}), not a checkpoint; {pass_instead}."
    return f"it is not a file that torch.save wrote (nothing in it was run); {pass_instead}."


def _redo(path: str, key: str) -> str:
    """What to do about a damaged checkpoint file: copy it again, or use its run's other checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None
    name = os.path.basename(path)
    if run_dir and name == LAST_NAME:
        return (
            f"copy it again if it was copied; otherwise the resume point is lost: train again (the run's {BEST_NAME}, "
            f"if whole, still holds its best editor)"
        )
    last = os.path.join(folder, LAST_NAME)
    if run_dir and name == BEST_NAME and os.path.isfile(last):
        return f"copy it again if it was copied, or pass {last} (the editor at the run's last checkpoint)"
    return "copy it again from where it came from, or train the editor again (python -m run)"


def load_checkpoint(
    archive: str, config, name: str = BEST_NAME, key: str = "archive", model: Optional[torch.nn.Module] = None
) -> dict:
    """Load a checkpoint without executing code and check it belongs to this base model and edited weights.

    ``ckpt["meta"]`` comes back as a dict. With ``model``, the edited weights' shapes must match too (a
    change of their values, e.g. another fine-tune under the same name, is only warned about).
    """
    path = checkpoint_path(archive, name, key)
    ckpt = read_checkpoint(path, key)
    meta = ckpt["meta"]
    mine = {"model": config.model.name, "inner_params": list(config.model.inner_params), "alg": config.alg}
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        diffs = "; ".join(
            f"{k}: checkpoint has {theirs[k]!r}, this run has {mine[k]!r}" for k in mine if theirs[k] != mine[k]
        )
        raise CheckpointError(f"{key}: {path} was trained for another setting ({diffs}).")
    identity = meta.get("base_model")
    if model is not None and identity:
        diff = identity_diff(model, {"edited_weights": identity.get("edited_weights", {})})
        _refuse_other_shapes(diff, f"{key}: {path}", f"this model's {config.model.name}")
    ckpt["path"] = path
    return ckpt


def config_from_meta(meta: dict, path: str):
    """The full run configuration stored in a checkpoint's metadata, as an OmegaConf object."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its metadata holds no run configuration; it cannot be used to edit.")
    try:
        return merge_saved_config(saved)  # keys added since take their defaults, keys removed since are dropped
    except Exception:  # written by another version of the schema: take it as it is
        return OmegaConf.create(saved)


def check_base_model(model: torch.nn.Module, meta: dict, inner_params: List[str], path: str) -> None:
    """Refuse a base model the editor was not trained for (other class, missing or reshaped edited weights)."""
    trained_for = meta.get("base_model") or {}
    name = meta.get("model", "?")
    cls = type(model).__name__
    if trained_for.get("class") and trained_for["class"] != cls:
        raise CheckpointError(
            f"{path}: this editor was trained for a {trained_for['class']} ({name}); the base model given is a "
            f"{cls}. An editor only edits the model (architecture and weights) it was trained on."
        )
    try:
        check_inner_params(model, inner_params)
    except InnerParamsError as e:
        raise CheckpointError(
            f"{path}: this editor edits {inner_params}, which do not fit the base model given ({cls}): {e}"
        ) from None
    diff = identity_diff(model, trained_for, weight_identity(model, inner_params))
    _refuse_other_shapes(diff, path, "the base model given")


# -- writing --------------------------------------------------------------------------------------------------
def checkpoint_meta(config, identity: dict) -> str:
    """The ``"meta"`` entry of a checkpoint of ``config``'s editor on the base model of ``identity``."""
    return json.dumps(
        {
            "model": config.model.name,
            "inner_params": list(config.model.inner_params),
            "alg": config.alg,
            "base_model": identity,
            "config": OmegaConf.to_container(config, resolve=True),
        }
    )


def write_checkpoint(obj: Optional[dict], path: str, step: int, run_dir: str) -> None:
    """Rank 0 writes ``obj`` to ``path`` atomically (the other ranks pass None); under torchrun every rank learns
    whether that worked. A failed write raises :class:`CheckpointWriteError` saying what is kept and how to go on."""
    error: Optional[OSError] = None
    if distributed.env().is_main:
        try:
            atomic_torch_save(obj, path)
        except OSError as e:
            error = e
    if distributed.any_rank(error is not None) and error is None:  # the other ranks stop with rank 0
        raise CheckpointWriteError(f"Rank 0 could not write the checkpoint {path} (its log says why).")
    if error is not None:
        e = error
        name = os.path.basename(path)
        reason = "no space left on the device" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
        last = os.path.join(os.path.dirname(path), LAST_NAME)
        kept = [f"the previous {name} is intact" if os.path.exists(path) else f"no {name} was written before"]
        if os.path.exists(last):
            kept.append(f"after fixing this, continue with resume={run_dir}")
        raise CheckpointWriteError(
            f"Could not write the checkpoint {path}: {reason}. Training stopped at step {step}; {'; '.join(kept)}."
        ) from e
