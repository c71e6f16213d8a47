"""What ``python -m run`` does with a trainer: train, then evaluate the best editor and report.

:func:`train_and_evaluate` trains (unless the editor has nothing to train, or ``eval_only``), reloads the best
checkpoint, evaluates it on held-out edits next to the untrained editor (``eval.compare_untrained``), and writes
``results.json`` and the summary table.
"""

from __future__ import annotations

import logging
import os

from omegaconf import OmegaConf

import distributed
from checkpoints import BEST_NAME, read_checkpoint
from reporting import summary_table
from utils import peak_memory_mb, write_json

LOG = logging.getLogger(__name__)


def train_and_evaluate(trainer) -> dict:
    """Train with ``trainer`` (a ``trainer.EditTrainer``), then evaluate; the report written to results.json."""
    cfg = trainer.config
    if not trainer.editor.needs_training:
        LOG.info("alg=%s has nothing to train: writing its settings for python -m edit.", cfg.alg)
        trainer.checkpoints.write_best(trainer.editor, trainer.state, {})  # its settings, for python -m edit
    elif not cfg.eval_only:
        trainer.train()
        reload_best(trainer)
    if not cfg.eval.final_eval:
        LOG.info("eval.final_eval=false: no final evaluation (python -m edit eval --archive %s).", trainer.run_dir)
        return {}
    report = final_evaluation(trainer)
    out_dir = cfg.results_dir or trainer.run_dir
    path = os.path.join(os.path.expanduser(out_dir), "results.json")
    if not trainer.dist.is_main:  # every rank holds the same report; rank 0 writes it
        return report
    write_json(report, path)
    trainer.log(report["results"], trainer.state.step + 1)
    LOG.info("\n%s", summary_table(report, cfg.task))
    LOG.info("Wrote %s", path)
    trainer.finish_logging()
    return report


def reload_best(trainer) -> None:
    """Load checkpoints/best.pt into the trainer's editor (on every rank), if training wrote one."""
    best = os.path.join(trainer.checkpoints.dir, BEST_NAME)
    if trainer.config.save and distributed.broadcast_object(os.path.exists(best)):  # rank 0 reads it, then shares it
        if trainer.dist.is_main:
            ckpt = read_checkpoint(best)
            trainer.editor.load_state_dict(ckpt["editor"])
            LOG.info("Reloaded the best checkpoint (step %d).", ckpt["step"])
        distributed.broadcast_module(trainer.editor)


def final_evaluation(trainer) -> dict:
    """The editor on ``eval.final_steps`` held-out batches, the untrained editor beside it, and the run's figures."""
    cfg, state = trainer.config, trainer.state
    steps = cfg.eval.final_steps or cfg.val_steps
    report = {"results": trainer.validate(steps, desc="final evaluation")}
    if cfg.eval.compare_untrained and trainer.editor.needs_training:
        untrained = trainer.make_editor()
        distributed.broadcast_module(untrained)  # the same untrained editor on every rank
        untrained.copy_statistics_from(trainer.editor)  # data statistics, e.g. an input normalisation
        report["untrained"] = trainer.validate(steps, desc="untrained editor", editor=untrained)
    report["train"] = {
        "steps": state.step,
        "skipped_steps": state.n_skipped,
        "seconds": state.train_seconds,
        "best_step": state.stopper.best_step,
        "validations": state.val_history,  # the learning curve: every validation during training
    }
    report["memory"] = peak_memory_mb()
    report["config"] = OmegaConf.to_container(cfg, resolve=True)
    return report
