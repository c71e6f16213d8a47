"""Saving and resuming a long evaluation run (``python -m edit eval --out DIR``, continued with ``--resume``).

A sequential run of a thousand edits by ROME, MEMIT or AlphaEdit takes hours on a CPU (about 10 s an edit). While
a run of :func:`fact_eval.evaluate` goes on, its progress is written, every ``save_seconds`` and when a stop is asked
for (SIGINT / SIGTERM), to one file beside its results, ``<run name>.progress.safetensors``, through a temporary file
(an interrupted write leaves the previous one):

- the edited weights as the next update reads them (every update so far applied, in the weights' own dtype);
- the editor's lifelong state (AlphaEdit's sums of preserved keys, UltraEdit's and RLEdit's statistics);
- where the run is (its group, and the cases of that group applied), its timers, the retention checks made so far
  and the records of the groups already finished;
- what the run is: the editor, the base model's edited weights (shapes and hashes), the mode, group size, edits per
  update, retention and the case ids. A resume with any of them changed is refused.

A resumed run continues from the saved update with those weights bit for bit, so its figures are the ones an
uninterrupted run gives (timings aside: they add the seconds of each part). The file is removed when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, Dict, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from errors import UserError
from utils import atomic_write

FORMAT = "mend-eval-progress/1"
SUFFIX = ".progress.safetensors"
SAVE_SECONDS = 600.0  # how often a run's progress is written (the last update's work is what a crash loses)


class EvaluationStopped(Exception):
    """A run stopped when asked to (SIGINT / SIGTERM), its progress saved in ``path``."""

    def __init__(self, path: str, done: int, total: int):
        super().__init__(f"stopped after {done} of {total} edits; the progress is saved in {path}")
        self.path, self.done, self.total = path, done, total


class ProgressMismatchError(UserError, ValueError):
    """A saved progress file belongs to another run than the one asked for."""


def progress_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name + SUFFIX)


def run_identity(editor, mode: str, size: int, step: int, retention: int, cases: Sequence[dict]) -> dict:
    """What a saved run must share with the run that resumes it."""
    ids = json.dumps([str(c["case_id"]) for c in cases])
    return {
        "format": FORMAT,
        "editor": os.path.abspath(str(editor.path)) if editor.path else "",
        "alg": str(editor.config.alg),
        "model": str(editor.config.model.name),
        "mode": mode,
        "n_edits": int(size),
        "edits_per_step": int(step),
        "retention": int(retention),
        "n_cases": len(cases),
        "case_ids_sha256": hashlib.sha256(ids.encode()).hexdigest()[:16],
    }


def read_progress_meta(path: str) -> dict:
    """The JSON part of a progress file (its identity and counters), without its tensors."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {})["progress"])
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ProgressMismatchError(
            f"{path}: not a readable progress file ({type(e).__name__}: {e}); delete it to start the run again."
        ) from None


class RunProgress:
    """The progress file of one run: :meth:`load` what an earlier process saved, :meth:`save` every
    ``save_seconds`` (:meth:`due`) or when stopping; :func:`remove_progress` once the run's results are written."""

    def __init__(self, path: str, identity: dict, save_seconds: float = SAVE_SECONDS, clock: Callable = time.monotonic):
        self.path, self.identity, self.save_seconds, self.clock = path, identity, float(save_seconds), clock
        self.last = clock()

    def due(self) -> bool:
        return self.clock() - self.last >= self.save_seconds

    def load(self, base_identity: Callable[[Sequence[str]], dict]) -> Optional[dict]:
        """The saved state (``state`` dict, ``weights``, ``editor`` tensors), or None when there is none. Refused
        when it belongs to another run or another base model (``base_identity(names)``: the identity of the base
        model's weights ``names``, as :meth:`patches.EditedModel.base_identity`)."""
        if not os.path.exists(self.path):
            return None
        meta = read_progress_meta(self.path)
        saved = meta.get("identity", {})
        for key, want in self.identity.items():
            if saved.get(key) != want:
                raise ProgressMismatchError(
                    f"{self.path} holds the progress of another run: its {key} is {saved.get(key)!r}, this run's "
                    f"{want!r}. Delete it to start this run afresh, or choose another --out."
                )
        with safe_open(self.path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        weights = {k[len("weight::") :]: v for k, v in tensors.items() if k.startswith("weight::")}
        editor = {k[len("editor::") :]: v for k, v in tensors.items() if k.startswith("editor::")}
        if weights and base_identity(sorted(weights)) != meta.get("base_weights"):
            raise ProgressMismatchError(
                f"{self.path} was saved on another base model (the identity of its edited weights differs). "
                "Delete it to start this run afresh on this model."
            )
        return {"state": meta["state"], "weights": weights, "editor": editor}

    def save(
        self,
        state: dict,
        weights: Dict[str, torch.Tensor],
        editor_state: Dict[str, torch.Tensor],
        base_identity: Callable[[Sequence[str]], dict],
    ) -> None:
        tensors = {f"weight::{k}": v.detach().cpu().clone() for k, v in weights.items()}
        tensors.update({f"editor::{k}": v.detach().cpu().clone() for k, v in editor_state.items()})
        meta = {"identity": self.identity, "state": state, "base_weights": base_identity(sorted(weights))}
        atomic_write(self.path, lambda tmp: save_file(tensors, tmp, metadata={"progress": json.dumps(meta)}), SUFFIX)
        self.last = self.clock()


def remove_progress(path: str) -> None:
    """Remove a run's progress file (its results written, or the run started afresh)."""
    if os.path.exists(path):
        os.remove(path)
