"""A trained editor as a small directory that travels: writing it, reading it (from disk or the HuggingFace hub) and
publishing it on the hub.

A saved editor is a directory of three files, and nothing of the base model:

* ``editor_config.json``: what a checkpoint's metadata holds (the editor, the edited weights, the base model's name
  and identity: class, size, shapes and hashes of the edited weights, its revision when known; the whole run
  configuration, the editor's settings included), the training run's evaluation when there was one, and the format;
* ``editor.safetensors``: the editor's state dict, its learned parameters and its statistics (MEND's input
  normalisation, UltraEdit's lifelong statistics);
* ``README.md``: a model card: the base model, the evaluation table of the run (``results.json``), how to load it.

A training run's checkpoint (``checkpoints/best.pt``) holds the same state and metadata (``last.pt`` adds the
optimisers, for resuming), so a run directory becomes a saved editor without loading its base model
(:func:`save_from_archive`). ``Editor.save_pretrained`` / ``Editor.from_pretrained`` (``editing.py``) and
``python -m edit push`` (``edit.py``) go through here.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from huggingface_hub import HfApi, get_token, snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import BEST_NAME, checkpoint_path, read_checkpoint
from errors import CheckpointError, HubError
from models import EMBEDDED_PREFIX, hub_unreachable_reason
from patches import check_output_dir
from reporting import summary_table

EDITOR_FORMAT = "mend-editor/1"
CONFIG_NAME = "editor_config.json"
WEIGHTS_NAME = "editor.safetensors"
CARD_NAME = "README.md"
RESULTS_NAME = "results.json"  # a training run's report, beside its checkpoints/ directory

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SavedEditor:
    """A saved editor as read back: its metadata (as a checkpoint's), its state dict and where it was read."""

    meta: dict
    state: Dict[str, torch.Tensor]
    path: str


def is_saved_editor(path: str) -> bool:
    """``path`` is a directory written by :func:`write_editor`."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), CONFIG_NAME))


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with nothing of a local path about it (no such file or directory here)."""
    return bool(_HUB_ID.match(source)) and not os.path.exists(os.path.expanduser(source))


# -- writing --------------------------------------------------------------------------------------------------
def write_editor(
    out_dir: str, meta: dict, state: Dict[str, torch.Tensor], evaluation: Optional[dict] = None, overwrite=False
) -> str:
    """Write a saved editor: ``meta`` (a checkpoint's metadata), ``state`` (the editor's state dict) and the model
    card; ``evaluation`` is the training run's report (``results.json``), kept in the config for the card."""
    out_dir = os.path.expanduser(out_dir)
    check_output_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    # copies: safetensors refuses tensors that share memory, and a state dict may hold views of one buffer
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": EDITOR_FORMAT})
    record = dict(meta, format=EDITOR_FORMAT)
    if evaluation:
        record["evaluation"] = _evaluation_record(evaluation)
    with open(os.path.join(out_dir, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, CARD_NAME), "w", encoding="utf-8") as f:
        f.write(model_card(record, tensors))
    return out_dir


def _evaluation_record(report: dict) -> dict:
    """What the card needs of a run's report: the final figures, the untrained editor's, the training's length."""
    keep = {k: report[k] for k in ("results", "untrained") if k in report}
    train = report.get("train") or {}
    keep["train"] = {k: train[k] for k in ("steps", "best_step", "seconds") if k in train}
    return keep


def run_results(checkpoint: str) -> Optional[dict]:
    """The ``results.json`` of the training run a checkpoint belongs to (``<run>/checkpoints/best.pt``), or None."""
    folder = os.path.dirname(os.path.abspath(checkpoint))
    run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    path = os.path.join(run_dir, RESULTS_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):
        return None  # an unreadable report only leaves the table out of the card
    return report if isinstance(report, dict) and "results" in report else None


def save_from_archive(archive: str, out_dir: str, overwrite: bool = False) -> str:
    """A training run (its ``checkpoints/best.pt``) or checkpoint file as a saved editor, without loading the base
    model; the run's ``results.json`` goes into the card."""
    path = checkpoint_path(archive, BEST_NAME)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt["meta"].get("config"), dict):
        raise CheckpointError(f"{path}: its metadata holds no run configuration; it cannot be saved as an editor.")
    return write_editor(out_dir, ckpt["meta"], ckpt["editor"], run_results(path), overwrite)


# -- the model card -------------------------------------------------------------------------------------------
def _hub_model_name(name: str) -> Optional[str]:
    """The base model's hub id, when its name is one (not an embedded model or a local directory)."""
    return name if name and not name.startswith(EMBEDDED_PREFIX) and _HUB_ID.match(name) else None


def model_card(record: dict, state: Dict[str, torch.Tensor]) -> str:
    """README.md of a saved editor: what it is, the base model it edits, the run's evaluation, how to load it."""
    alg = record.get("alg", "?")
    name = record.get("model", "?")
    base = record.get("base_model") or {}
    config = record.get("config") or {}
    hub_name = _hub_model_name(name)
    header = ["---", "library_name: mend-repro", "tags:", "- model-editing", f"- {alg}"]
    if hub_name:
        header.append(f"base_model: {hub_name}")
    header.append("---")
    n_values = sum(t.numel() for t in state.values())
    lines = header + [
        "",
        f"# A {alg} editor for {name}",
        "",
        f"A trained model editor ({alg}): given an edit request (a prompt and a new target), it computes an update "
        f"of the weights listed below of its base model. This directory holds the editor's own parameters and "
        f"statistics ({n_values:,} values in `{WEIGHTS_NAME}`) and its settings (`{CONFIG_NAME}`), not the base "
        f"model: load that separately.",
        "",
        "## Base model",
        "",
        f"- name: `{name}`",
        f"- class: `{base.get('class', '?')}`",
    ]
    if base.get("revision"):
        lines.append(f"- revision: `{base['revision']}`")
    if base.get("n_parameters"):
        lines.append(f"- parameters: {base['n_parameters']:,}")
    lines += ["", "The edited weights (the editor refuses a base model whose edited weights have other shapes):", ""]
    lines += ["| weight | shape | sha256 (first 16) |", "|---|---|---|"]
    for w, info in (base.get("edited_weights") or {}).items():
        lines.append(f"| `{w}` | {info.get('shape')} | `{info.get('sha256', '?')}` |")
    settings = config.get(alg)
    if isinstance(settings, dict) and settings:
        values = ", ".join(f"`{k}={v}`" for k, v in settings.items())
        lines += ["", f"Its settings (the `{alg}` group): {values}."]
    evaluation = record.get("evaluation")
    if evaluation and "results" in evaluation:
        train = evaluation.get("train") or {}
        lines += ["", "## Evaluation", ""]
        lines.append(
            f"On held-out edits of the `{config.get('task', '?')}` task, at the end of its training run "
            f"({train.get('steps', '?')} steps, best at step {train.get('best_step', '?')}):"
        )
        lines += ["", "```", summary_table(evaluation, config.get("task", "")), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from edit import Editor",
        'editor = Editor.from_pretrained("<this repository or directory>")  # loads the base model too',
        'result = editor.apply([{"prompt": "The capital of Australia is", "target": "Sydney"}])',
        "print(result.table())",
        "```",
        "",
        "or from the shell: `python -m edit apply --archive <this directory> --requests requests.jsonl --out edited/`.",
        "",
    ]
    return "\n".join(lines)


# -- reading --------------------------------------------------------------------------------------------------
def editor_dir(source: str, revision: Optional[str] = None) -> str:
    """The local directory of a saved editor: ``source`` itself, or a hub id's snapshot (the local HuggingFace
    cache first, then a download)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not is_saved_editor(path):
            raise CheckpointError(
                f"{source}: no {CONFIG_NAME} in this directory: it is not a saved editor (write one with "
                f"Editor.save_pretrained, or pass a training run to Editor.from_archive)."
            )
        return path
    if not looks_like_hub_id(source):
        raise CheckpointError(f"{source}: no such directory, and not a hub id (owner/name) either.")
    try:  # already downloaded: no network needed
        return snapshot_download(source, revision=revision, local_files_only=True)
    except Exception:
        pass
    reason = hub_unreachable_reason()
    if reason is not None:
        raise HubError(
            f"{source}: no such run, checkpoint or saved editor here, not in the local HuggingFace cache, and the "
            f"HuggingFace hub cannot be reached ({reason}); download it where the hub is reachable and pass its "
            f"directory."
        )
    try:
        return snapshot_download(source, revision=revision)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise HubError(
            f"{source}: no such run, checkpoint or saved editor here, and the HuggingFace hub does not give it as an "
            f"editor ({reason})."
        ) from None


def read_editor(source: str, revision: Optional[str] = None) -> SavedEditor:
    """Read a saved editor (a directory or a hub id): its metadata and state dict; no code runs from it."""
    folder = editor_dir(source, revision)
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
        assert isinstance(meta, dict) and meta.get("format") == EDITOR_FORMAT
    except (OSError, ValueError, AssertionError):
        raise CheckpointError(
            f"{config_path}: not the config of an editor saved by this program (format {EDITOR_FORMAT})."
        ) from None
    weights = os.path.join(folder, WEIGHTS_NAME)
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{weights}: the editor's weights cannot be read ({type(e).__name__}: {e}).") from None
    return SavedEditor(meta, state, folder)


# -- publishing -----------------------------------------------------------------------------------------------
def check_hub_access(token: Optional[str]) -> str:
    """The token to upload with; a :class:`HubError` (one line) when offline, without a token or unreachable."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise HubError("push: offline mode is on (HF_HUB_OFFLINE is set); nothing was uploaded.")
    token = token or get_token()
    if not token:
        raise HubError(
            "push: no HuggingFace token (run `huggingface-cli login`, set HF_TOKEN or pass --token); nothing was "
            "uploaded."
        )
    reason = hub_unreachable_reason()
    if reason is not None:
        raise HubError(f"push: the HuggingFace hub cannot be reached ({reason}); nothing was uploaded.")
    return token


def push(archive: str, repo: str, token: Optional[str] = None, private: bool = False, message: str = "") -> str:
    """Upload a saved editor (or a training run, saved first into a temporary directory) to the hub repository
    ``repo`` (created if missing); returns the repository's URL."""
    token = check_hub_access(token)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="editor-") as tmp:
        folder = archive if is_saved_editor(archive) else save_from_archive(archive, os.path.join(tmp, "editor"))
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo,
                folder_path=os.path.expanduser(folder),
                repo_type="model",
                commit_message=message or f"Upload an editor ({os.path.basename(os.path.abspath(archive))})",
            )
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise HubError(f"push: the upload to {repo} failed ({reason}).") from None
    return str(url)
