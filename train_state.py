"""A training run's state between steps, and the two checkpoints that keep it.

:class:`TrainState` holds the counters of a run (steps, skipped steps, time, validations, early stopping);
:class:`RunCheckpoints` writes ``checkpoints/best.pt`` (the best editor so far: what ``archive=`` and the final
evaluation load) and ``checkpoints/last.pt`` (everything needed to continue exactly where training is: the editor,
the optimisers, the gradients accumulated since the last optimiser step, the state and every process's RNG), and
restores a run from ``last.pt`` (``resume=``). The file format is ``checkpoints.py``'s.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

import distributed
from checkpoints import (
    BEST_NAME,
    LAST_NAME,
    base_model_identity,
    changed_settings,
    checkpoint_meta,
    load_checkpoint,
    load_editor_state,
    write_checkpoint,
)
from errors import CheckpointError
from utils import EarlyStopper, rng_state, set_rng_state

LOG = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The counters of a training run (the ``trainer`` entry of ``last.pt``, with ``step`` and the stopper)."""

    stopper: EarlyStopper
    step: int = 0  # training batches consumed over all processes (a step of N processes advances it by N)
    n_skipped: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_nonfinite: int = 0
    train_seconds: float = 0.0
    last_val_step: int = -1
    val_history: list = field(default_factory=list)  # one entry per validation: {"step": ..., metric: value}
    finished: bool = False  # training is over (a resumed finished run only evaluates)

    def counters(self, batches_per_step: int) -> dict:
        return {
            "n_skipped": self.n_skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "last_val_step": self.last_val_step,
            "val_history": self.val_history,
            "train_seconds": self.train_seconds,
            "finished": self.finished,
            "batches_drawn": self.step * batches_per_step,
        }

    def load(self, ckpt: dict) -> None:
        counters = ckpt["trainer"]
        self.step = int(ckpt["step"])
        self.n_skipped = int(counters["n_skipped"])
        self.consecutive_nonfinite = int(counters["consecutive_nonfinite"])
        self.last_val_step = int(counters["last_val_step"])
        self.val_history = list(counters.get("val_history", []))  # absent in checkpoints written before it existed
        self.train_seconds = float(counters["train_seconds"])
        self.finished = bool(counters["finished"])
        self.stopper.load_state_dict(ckpt["stopper"])


#: The optimisers of a run by their key in last.pt, each with the learning rate the configuration gives it now.
Optimisers = Dict[str, Tuple[Optional[torch.optim.Optimizer], Optional[float]]]


class RunCheckpoints:
    """``checkpoints/best.pt`` and ``checkpoints/last.pt`` of the run in ``run_dir``. Under torchrun every rank
    calls the same methods (the collective parts need them all) and rank 0 writes."""

    def __init__(self, config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.dir = os.path.join(run_dir, "checkpoints")
        self.dist = distributed.env()
        self._identity: Optional[dict] = None

    def _meta(self, editor) -> str:
        if self._identity is None:
            self._identity = base_model_identity(editor.model, self.config.model.inner_params)
        return checkpoint_meta(self.config, self._identity)

    def _write(self, obj: Optional[dict], name: str, step: int) -> None:
        write_checkpoint(obj, os.path.join(self.dir, name), step, self.run_dir)

    def write_best(self, editor, state: TrainState, stats: Dict[str, float]) -> None:
        """The best editor so far (checkpoints/best.pt): what archive= and the final evaluation load."""
        if not self.config.save:
            return
        if not self.dist.is_main:  # the editor is the same on every rank: rank 0 writes it
            self._write(None, BEST_NAME, state.step)
            return
        best = {
            "editor": editor.state_dict(),
            "step": state.step,
            "val_stats": {k: float(v) for k, v in stats.items()},
            "stopper": state.stopper.state_dict(),
            "meta": self._meta(editor),
        }
        self._write(best, BEST_NAME, state.step)

    def write_last(self, editor, optimisers: Optimisers, state: TrainState) -> None:
        """Everything needed to continue exactly where training is now (checkpoints/last.pt)."""
        if not self.config.save:
            return
        # Collective parts first (every rank takes part): the accumulated gradients and each rank's RNG state.
        grads = distributed.mean_gradients(editor.named_parameters())
        rng_ranks = distributed.gather_objects(rng_state())
        if not self.dist.is_main:
            self._write(None, LAST_NAME, state.step)
            return
        last = {
            "editor": editor.state_dict(),
            **{key: opt.state_dict() if opt is not None else {} for key, (opt, _) in optimisers.items()},
            "grads": grads,
            "step": state.step,
            "stopper": state.stopper.state_dict(),
            "trainer": state.counters(editor.batches_per_step),
            "rng": rng_ranks[0],
            "rng_ranks": rng_ranks if self.dist.enabled else [],
            "meta": self._meta(editor),
        }
        self._write(last, LAST_NAME, state.step)

    def resume(self, resume: str, editor, optimisers: Optimisers, state: TrainState) -> None:
        """Restore the whole training state of checkpoints/last.pt: continuing gives the same run as no stop."""
        cfg = self.config
        ckpt = load_checkpoint(resume, cfg, name=LAST_NAME, key="resume", model=editor.model)
        changed = changed_settings(ckpt["meta"], cfg)
        if changed:
            LOG.warning("Resuming with settings that differ from the interrupted run: %s", "; ".join(changed))
        load_editor_state(editor, ckpt["editor"], ckpt["path"])
        for key, (opt, lr) in optimisers.items():
            if opt is not None and ckpt.get(key):
                try:
                    opt.load_state_dict(ckpt[key])
                except ValueError as e:  # the optimiser trains other parameters than the interrupted run's did
                    raise CheckpointError(
                        f"resume={resume}: the state of the optimiser {key!r} in {ckpt['path']} does not fit this "
                        f"editor's parameters ({e}); a setting that changes what is trained differs from the "
                        f"interrupted run's (see the warning above): resume with its settings."
                    ) from e
                for group in opt.param_groups:  # a changed rate on the command line takes effect
                    group["lr"] = lr
        params = dict(editor.named_parameters())
        if self.dist.is_main:  # gradients accumulated since the last optimiser step (see distributed.mean_gradients)
            for name, grad in ckpt.get("grads", {}).items():
                params[name].grad = grad.to(params[name].device) * self.dist.world_size
        state.load(ckpt)
        set_rng_state(distributed.per_rank(ckpt.get("rng_ranks"), self.dist.rank, ckpt["rng"]))
        LOG.info(
            "Resuming %s from step %d%s; checkpoints and results go to %s.",
            ckpt["path"],
            state.step,
            " (training had finished: evaluating only)" if state.finished else "",
            self.run_dir,
        )

    def load_archive(self, archive: str, editor) -> None:
        """Start from the editor of another run (``archive=``)."""
        ckpt = load_checkpoint(archive, self.config, model=editor.model)
        load_editor_state(editor, ckpt["editor"], ckpt["path"])
        LOG.info("Loaded editor from %s (step %s)", ckpt["path"], ckpt.get("step"))
