"""Training and evaluation of an editor (DESIGN: L = c_edit * L_e + c_loc * L_loc, first order).

One training step: draw a batch (edits + locality), edit the model, measure the edit loss on the
equivalence input and the KL to the unedited model on the locality input, and backpropagate into
the editor. Optimiser steps every ``accumulate_bs`` steps; validation every ``val_interval`` steps
keeps the best checkpoint; a final evaluation reloads it and writes results.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, Dict, Optional

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from editable_model import EditableModel
from losses import kl_loc_loss
from utils import EarlyStopper, StatAverager, atomic_torch_save, model_inputs, to_device, write_json

LOG = logging.getLogger(__name__)

CHECKPOINT_NAME = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or made for another model."""


def checkpoint_path(archive: str) -> str:
    """``archive`` may be a checkpoint file or a run directory (its checkpoints/best.pt)."""
    path = os.path.expanduser(archive)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"archive={archive!r}: no checkpoint found at {path}. Pass a checkpoint file or the run directory of a "
            f"training run (it holds checkpoints/{CHECKPOINT_NAME})."
        )
    return path


def load_checkpoint(archive: str, config) -> dict:
    """Load a checkpoint without executing code and check it belongs to this base model and edited weights."""
    path = checkpoint_path(archive)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted or not a checkpoint at all
        raise CheckpointError(f"archive {path} could not be read as a checkpoint ({type(e).__name__}: {e}).") from e
    meta = json.loads(ckpt.get("meta", "{}"))
    mine = {"model": config.model.name, "inner_params": list(config.model.inner_params), "alg": config.alg}
    theirs = {k: meta.get(k) for k in mine}
    if theirs != mine:
        diffs = "; ".join(
            f"{k}: checkpoint has {theirs[k]!r}, this run has {mine[k]!r}" for k in mine if theirs[k] != mine[k]
        )
        raise CheckpointError(f"archive {path} was trained for another setting ({diffs}).")
    return ckpt


class EditTrainer:
    def __init__(self, make_editor: Callable[[], EditableModel], config, train_set, val_set, run_dir: str):
        self.config = config
        self.make_editor = make_editor
        self.editor = make_editor()
        self.train_set, self.val_set = train_set, val_set
        self.run_dir = run_dir
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.device = next(iter(self.editor.model.parameters())).device
        self.step = 0
        self.n_skipped = 0
        self.consecutive_nonfinite = 0
        self.train_seconds = 0.0
        self.stopper = EarlyStopper(config.early_stop_patience, config.early_stop_key)

        step_params = {id(p) for p in self.editor.step_size_parameters()}
        main_params = [p for p in self.editor.outer_parameters() if id(p) not in step_params]
        opt_class = getattr(torch.optim, config.opt)
        self.opt = opt_class(main_params, lr=config.lr) if main_params else None
        step_size_params = self.editor.step_size_parameters()
        self.lr_opt = opt_class(step_size_params, lr=config.lr_lr) if step_size_params else None

        if config.archive is not None:
            ckpt = load_checkpoint(config.archive, config)
            self.editor.load_state_dict(ckpt["editor"])
            LOG.info("Loaded editor from %s (step %s)", checkpoint_path(config.archive), ckpt.get("step"))

        self.wandb = self._init_wandb()

    # -- logging --------------------------------------------------------------------------
    def _init_wandb(self):
        w = self.config.wandb
        if not w.enabled or w.mode == "disabled":
            return None
        try:
            import wandb
        except ImportError:
            LOG.warning(
                "wandb is not installed: logging to the console only (pip install wandb, or wandb.enabled=false)."
            )
            return None
        model = os.path.basename(self.config.model.name)
        name = f"{self.config.task}-{self.config.alg}-{model}-{os.path.basename(self.run_dir)}"
        return wandb.init(
            project=w.project,
            entity=w.entity,
            mode=w.mode,
            dir=self.run_dir,
            name=name,
            config=OmegaConf.to_container(self.config, resolve=True),
        )

    def _log(self, stats: Dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(stats, step=step)

    # -- one edit step ----------------------------------------------------------------------
    def edit_step(self, batch: dict, training: bool) -> Dict[str, float]:
        cfg = self.config
        editor = self.editor
        editor.train(training)
        batch = to_device(batch, self.device)
        loc, outer = batch["loc"], batch["edit_outer"]
        loc_mask = loc.get("decoder_attention_mask", loc["attention_mask"])

        with torch.no_grad():
            pre_loc_logits = editor(**model_inputs(loc))
            pre_edit = None if training else editor.edit_loss_fn(editor(**model_inputs(outer)), outer["labels"])

        start = time.perf_counter()
        edited, info = editor.edit(batch["edit_inner"], batch.get("cond"))
        edit_time = time.perf_counter() - start

        with torch.set_grad_enabled(training):
            post_edit = edited.edit_loss_fn(edited(**model_inputs(outer)), outer["labels"])
            post_loc_logits = edited(**model_inputs(loc))
            l_edit = post_edit["nll"]
            l_loc = kl_loc_loss(pre_loc_logits, post_loc_logits, loc_mask)
            l_total_edit = cfg.cedit * l_edit + cfg.cloc * l_loc

        if training:
            self._backward(l_total_edit)

        with torch.no_grad():
            pre_loc = editor.loc_loss_fn(pre_loc_logits, loc["labels"])
            post_loc = editor.loc_loss_fn(post_loc_logits.detach(), loc["labels"])
        info.update(
            {
                "loss/edit": l_edit.item(),
                "loss/loc": l_loc.item(),
                "loss/total": l_total_edit.item(),
                "loss/total_edit": l_total_edit.item(),
                "edit/acc": post_edit["acc"].item(),
                "edit/acc_tok": post_edit["acc_tok"].item(),
                "edit/log_prob": post_edit["log_prob"].item(),
                "edit/prob": post_edit["prob"].item(),
                "acc/pre": pre_loc["acc_tok"].item(),
                "acc/post": post_loc["acc_tok"].item(),
                "nll/pre": pre_loc["nll"].item(),
                "nll/post": post_loc["nll"].item(),
                "nll_sum/pre": pre_loc["nll_sum"].item(),
                "nll_sum/post": post_loc["nll_sum"].item(),
                "n_tokens/pre": pre_loc["n_tokens"].item(),
                "n_tokens/post": post_loc["n_tokens"].item(),
                "time/edit": edit_time,
            }
        )
        if pre_edit is not None:
            info["edit/acc_pre"] = pre_edit["acc"].item()
            info["edit/log_prob_pre"] = pre_edit["log_prob"].item()
        for p in editor.step_size_parameters():
            info.update({f"lr/lr{i}": lr.item() for i, lr in enumerate(p.detach().reshape(-1))})
        return info

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(outer params); a step with non-finite loss or gradients is skipped and counted."""
        params = [p for p in self.editor.outer_parameters() if p.requires_grad]
        grads = None
        if torch.isfinite(loss):
            grads = torch.autograd.grad(loss / self.config.accumulate_bs, params, allow_unused=True)
        if grads is None or not all(g is None or torch.isfinite(g).all() for g in grads):
            self.n_skipped += 1
            self.consecutive_nonfinite += 1
            LOG.warning("Step %d: non-finite loss or gradient, step skipped (%d so far).", self.step, self.n_skipped)
            if self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
                raise RuntimeError(
                    f"{self.consecutive_nonfinite} consecutive training steps had non-finite losses or gradients; "
                    f"stopping. Lower lr / edit_lr, or raise max_nonfinite_steps to keep going."
                )
            return
        self.consecutive_nonfinite = 0
        for p, g in zip(params, grads):
            if g is None:
                continue
            p.grad = g if p.grad is None else p.grad + g

    def _optimizer_step(self) -> Dict[str, float]:
        params = [p for p in self.editor.outer_parameters() if p.grad is not None]
        if not params:
            return {}
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        for opt in (self.opt, self.lr_opt):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return {"grad": norm.item()}

    # -- validation -----------------------------------------------------------------------
    def validate(self, steps: Optional[int] = None, desc: str = "validate", editor: Optional[EditableModel] = None):
        n_batches = max(1, len(self.val_set) // self.config.data.n_edits)
        steps = min(steps or self.config.val_steps, n_batches)
        saved = self.editor
        if editor is not None:
            self.editor = editor
        try:
            averager = StatAverager("_val")
            gen = self.val_set.edit_generator(self.config.val_batch_size, n=steps)
            start = time.perf_counter()
            for batch in tqdm(gen, total=steps, desc=desc, leave=False, disable=self.config.silent):
                averager.add(self.edit_step(batch, training=False))
            stats = averager.summary()
            stats["eval_time/elapsed"] = time.perf_counter() - start
            stats["eval_time/n_edits"] = steps * self.config.data.n_edits
        finally:
            self.editor = saved
        return stats

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, stats: Dict[str, float]) -> None:
        if not self.config.save:
            return
        meta = {
            "model": self.config.model.name,
            "inner_params": list(self.config.model.inner_params),
            "alg": self.config.alg,
            "config": OmegaConf.to_container(self.config, resolve=True),
        }
        atomic_torch_save(
            {
                "editor": self.editor.state_dict(),
                "opt": self.opt.state_dict() if self.opt is not None else {},
                "lr_opt": self.lr_opt.state_dict() if self.lr_opt is not None else {},
                "step": self.step,
                "val_stats": {k: float(v) for k, v in stats.items()},
                "stopper": self.stopper.state_dict(),
                "meta": json.dumps(meta),
            },
            os.path.join(self.ckpt_dir, CHECKPOINT_NAME),
        )

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config
        gen = self.train_set.edit_generator(cfg.batch_size)
        averager = StatAverager()
        start = time.perf_counter()
        bar = tqdm(total=cfg.max_iters, desc="train", disable=cfg.silent, dynamic_ncols=True)
        self.last_val_step = -1
        while self.step < cfg.max_iters:
            # 1. one edit and its losses, gradients accumulated into the editor
            averager.add(self.edit_step(next(gen), training=True))
            self.step += 1
            bar.update(1)
            # 2. an optimiser step every accumulate_bs edits
            if self.step % cfg.accumulate_bs == 0:
                averager.add(self._optimizer_step())
            # 3. console / wandb summaries of the last log_interval steps
            if self.step % cfg.log_interval == 0:
                stats = averager.summary()
                averager = StatAverager()
                bar.set_postfix({"loss": f"{stats['loss/total_edit']:.3f}", "ES": f"{stats['edit/acc']:.2f}"})
                LOG.info("step %d: %s", self.step, _fmt(stats))
                self._log(stats, self.step)
            out_of_time = cfg.max_time is not None and time.perf_counter() - start >= cfg.max_time
            # 4. validation, best checkpoint, early stopping
            if self.step % cfg.val_interval == 0 or out_of_time or self.step == cfg.max_iters:
                if self._validate_and_checkpoint():
                    break
            if out_of_time:
                LOG.info("max_time=%ss reached after %d steps.", cfg.max_time, self.step)
                break
        bar.close()
        self.train_seconds = time.perf_counter() - start
        LOG.info("Training done: %d steps in %.0fs, %d skipped.", self.step, self.train_seconds, self.n_skipped)

    def _validate_and_checkpoint(self) -> bool:
        """Validate; save a new best. True when early stopping says to stop."""
        if self.last_val_step == self.step:
            return False
        self.last_val_step = self.step
        stats = self.validate()
        LOG.info("validation at step %d: %s", self.step, _fmt(stats))
        self._log(stats, self.step)
        if self.stopper.update(self.step, stats):
            self.save_checkpoint(stats)
        if self.stopper.should_stop():
            LOG.info(
                "No improvement in %s for %d steps: stopping.",
                self.config.early_stop_key,
                self.config.early_stop_patience,
            )
            return True
        return False

    def run(self) -> dict:
        cfg = self.config
        if not cfg.eval_only:
            self.train()
            best = os.path.join(self.ckpt_dir, CHECKPOINT_NAME)
            if cfg.save and os.path.exists(best):
                ckpt = torch.load(best, map_location="cpu", weights_only=True)
                self.editor.load_state_dict(ckpt["editor"])
                LOG.info("Reloaded the best checkpoint (step %d).", ckpt["step"])
        if not cfg.eval.final_eval:
            return {}

        steps = cfg.eval.final_steps or cfg.val_steps
        results = self.validate(steps, desc="final evaluation")
        report = {"results": results}
        if cfg.eval.compare_untrained and hasattr(self.editor, "copy_statistics_from"):
            untrained = self.make_editor()
            untrained.copy_statistics_from(self.editor)
            report["untrained"] = self.validate(steps, desc="untrained editor", editor=untrained)
        report["train"] = {
            "steps": self.step,
            "skipped_steps": self.n_skipped,
            "seconds": self.train_seconds,
            "best_step": self.stopper.best_step,
        }
        report["config"] = OmegaConf.to_container(cfg, resolve=True)

        out_dir = cfg.results_dir or self.run_dir
        path = os.path.join(os.path.expanduser(out_dir), "results.json")
        write_json(report, path)
        self._log(results, self.step + 1)
        LOG.info("\n%s", summary_table(report, cfg.task))
        LOG.info("Wrote %s", path)
        if self.wandb is not None:
            self.wandb.finish()
        return report


def _fmt(stats: Dict[str, float]) -> str:
    keys = [
        k
        for k in stats
        if k.split("_val")[0]
        in (
            "loss/total_edit",
            "loss/edit",
            "loss/loc",
            "edit/acc",
            "edit/acc_pre",
            "perplexity/pre",
            "perplexity/post",
            "acc/pre",
            "acc/post",
            "time/edit",
            "grad",
        )
    ]
    return ", ".join(f"{k}={stats[k]:.4g}" for k in keys)


def summary_table(report: dict, task: str) -> str:
    """A side-by-side table of the trained and untrained editor's final metrics."""
    cols = [("trained", report["results"])]
    if "untrained" in report:
        cols.append(("untrained (identity init)", report["untrained"]))
    rows = [
        ("edit success (edit/acc_val)", "edit/acc_val", "{:.3f}"),
        ("edit success before the edit", "edit/acc_pre_val", "{:.3f}"),
        ("target token accuracy", "edit/acc_tok_val", "{:.3f}"),
        ("target log-prob", "edit/log_prob_val", "{:.3f}"),
    ]
    if task == "gen":
        rows += [
            ("locality perplexity, pre-edit", "perplexity/pre_val", "{:.3f}"),
            ("locality perplexity, post-edit", "perplexity/post_val", "{:.3f}"),
            ("drawdown (perplexity increase)", "perplexity/drawdown_val", "{:.3f}"),
        ]
    else:
        rows += [
            ("locality accuracy, pre-edit", "acc/pre_val", "{:.3f}"),
            ("locality accuracy, post-edit", "acc/post_val", "{:.3f}"),
            ("drawdown (accuracy decrease)", "acc/drawdown_val", "{:.4f}"),
        ]
    rows += [("median edit time (s)", "time/edit_val", "{:.3f}"), ("edits evaluated", "eval_time/n_edits", "{:.0f}")]
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(name.rjust(28) for name, _ in cols)]
    for label, key, fmt in rows:
        cells = []
        for _, stats in cols:
            v = stats.get(key)
            cells.append(
                (fmt.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-").rjust(28)
            )
        lines.append(label.ljust(width) + "".join(cells))
    return "\n".join(lines)
