"""Training and evaluation of an editor (DESIGN: L = c_edit * L_e + c_loc * L_loc, first order).

One training step: draw a batch (edits + locality), edit the model, measure the edit loss on the
equivalence input and the KL to the unedited model on the locality input, and backpropagate into
the editor. Optimiser steps every ``accumulate_bs`` steps; validation every ``val_interval`` steps
keeps the best checkpoint; a final evaluation reloads it and writes results.json.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import time
from typing import Callable, Dict, Optional

import torch
from omegaconf import OmegaConf
from torch.profiler import record_function
from tqdm import tqdm

import distributed
from blocks import LowerBlocks, grad_blocks
from checkpoints import (
    BEST_NAME,
    LAST_NAME,
    base_model_identity,
    changed_settings,
    checkpoint_meta,
    load_checkpoint,
    load_editor_state,
    read_checkpoint,
    write_checkpoint,
)
from editable_model import EditableModel
from errors import NonFiniteLossError, TrainingInterrupted
from losses import kl_loc_loss
from memory import activation_checkpointing
from reporting import format_stats, init_wandb, summary_table
from signals import graceful_stop
from utils import (
    EarlyStopper,
    StatAverager,
    all_finite,
    model_inputs,
    peak_memory_mb,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
    write_json,
)

LOG = logging.getLogger(__name__)


class _StopRequested(Exception):
    """Raised inside validation when a stop signal arrives, to checkpoint without finishing it."""


class EditTrainer:
    def __init__(self, make_editor: Callable[[], EditableModel], config, train_set, val_set, run_dir: str):
        self.config = config
        self.dist = distributed.env()  # rank and world size; a single process unless launched by torchrun
        distributed.check_world_size(config, self.dist.world_size)
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
        self.last_val_step = -1
        self.val_history: list = []  # one entry per validation during training: {"step": ..., metric: value}
        self.finished = False  # training is over (a resumed finished run only evaluates)
        self._stop_signal: Optional[int] = None
        self.stopper = EarlyStopper(config.early_stop_patience, config.early_stop_key)

        step_params = {id(p) for p in self.editor.step_size_parameters()}
        main_params = [p for p in self.editor.outer_parameters() if id(p) not in step_params]
        opt_class = getattr(torch.optim, config.opt)
        fused = config.speed.fused_optimizer and "fused" in inspect.signature(opt_class).parameters
        options = {"fused": True} if fused else {}
        self.opt = opt_class(main_params, lr=self.editor.outer_lr(), **options) if main_params else None
        step_size_params = self.editor.step_size_parameters()
        self.lr_opt = opt_class(step_size_params, lr=self.editor.step_size_lr()) if step_size_params else None

        if config.resume is not None:
            self._resume(config.resume)
        elif config.archive is not None:
            ckpt = load_checkpoint(config.archive, config, model=self.editor.model)
            self._load_editor(ckpt)
            LOG.info("Loaded editor from %s (step %s)", ckpt["path"], ckpt.get("step"))

        # Under torchrun: DDP over the editor's parameters (it starts every rank from rank 0's editor).
        wrap = self.dist.enabled and self.editor.needs_training  # FT trains nothing: no DDP wrapper
        self._lower: Optional[LowerBlocks] = None  # built on first use (_lower_blocks)
        self._ddp = distributed.wrap(self.editor, self._edit_losses, self.device) if wrap else None
        if self.dist.enabled and config.resume is None:
            seed_everything(config.seed + self.dist.rank)  # rank 0 keeps the single-process stream
        self.wandb = init_wandb(self.config, self.run_dir) if self.dist.is_main else None

    def _load_editor(self, ckpt: dict) -> None:
        load_editor_state(self.editor, ckpt["editor"], ckpt["path"])

    def _resume(self, resume: str) -> None:
        """Restore the whole training state of checkpoints/last.pt: continuing gives the same run as no stop."""
        cfg = self.config
        ckpt = load_checkpoint(resume, cfg, name=LAST_NAME, key="resume", model=self.editor.model)
        changed = changed_settings(ckpt["meta"], cfg)
        if changed:
            LOG.warning("Resuming with settings that differ from the interrupted run: %s", "; ".join(changed))
        self._load_editor(ckpt)
        for opt, key, lr in (
            (self.opt, "opt", self.editor.outer_lr()),
            (self.lr_opt, "lr_opt", self.editor.step_size_lr()),
        ):
            if opt is not None and ckpt.get(key):
                opt.load_state_dict(ckpt[key])
                for group in opt.param_groups:  # a changed rate on the command line takes effect
                    group["lr"] = lr
        params = dict(self.editor.named_parameters())
        if self.dist.is_main:  # gradients accumulated since the last optimiser step (see distributed.mean_gradients)
            for name, grad in ckpt.get("grads", {}).items():
                params[name].grad = grad.to(params[name].device) * self.dist.world_size
        state = ckpt["trainer"]
        self.step = int(ckpt["step"])
        self.n_skipped = int(state["n_skipped"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.last_val_step = int(state["last_val_step"])
        self.val_history = list(state.get("val_history", []))  # absent in checkpoints written before it existed
        self.train_seconds = float(state["train_seconds"])
        self.finished = bool(state["finished"])
        self.stopper.load_state_dict(ckpt["stopper"])
        set_rng_state(distributed.per_rank(ckpt.get("rng_ranks"), self.dist.rank, ckpt["rng"]))
        LOG.info(
            "Resuming %s from step %d%s; checkpoints and results go to %s.",
            ckpt["path"],
            self.step,
            " (training had finished: evaluating only)" if self.finished else "",
            self.run_dir,
        )

    # -- logging --------------------------------------------------------------------------
    def _log(self, stats: Dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(stats, step=step)

    # -- one edit step ----------------------------------------------------------------------
    def edit_step(self, batch: dict, training: bool, diagnostics: bool = False) -> Dict[str, float]:
        """One edit and its losses; in training, their gradients accumulated into the editor. ``diagnostics``: also
        the figures that are only logged (see ``speed.grad_stats_on_log_steps``)."""
        editor = self.editor
        editor.train(training)
        editor.diagnostics = diagnostics or not self.config.speed.grad_stats_on_log_steps
        batch = to_device(batch, self.device)
        loc, outer = batch["loc"], batch["edit_outer"]
        lower = self._lower_blocks()

        # The parts of a step are labelled for the profiler (benchmarks/step_speed.py reports their shares).
        with torch.no_grad(), record_function("step/pre_edit"):
            with lower.record() if lower else contextlib.nullcontext():
                pre_loc_logits = editor(**model_inputs(loc))
            pre_edit = None if training else editor.loss_with(outer, {})

        try:
            if training and self._ddp is not None:  # through DDP, which then averages the gradients over ranks
                with distributed.optional_no_sync(self._ddp, self._sync_due()):
                    out = self._ddp(batch, pre_loc_logits, training, lower)
            else:
                out = self._edit_losses(batch, pre_loc_logits, training, lower)
        finally:
            editor.diagnostics = False
            if lower:
                lower.clear()
        info, edit_time, post_edit = out["info"], out["edit_time"], out["post_edit"]
        post_loc_logits, l_edit, l_loc, l_total = out["post_loc_logits"], out["l_edit"], out["l_loc"], out["l_total"]
        l_total_edit, l_base = out["l_total_edit"], out["l_base"]

        if training:
            with record_function("step/backward"):
                self._backward(out["loss"])

        with torch.no_grad():
            pre_loc = editor.loc_loss_fn(pre_loc_logits, loc["labels"])
            post_loc = editor.loc_loss_fn(post_loc_logits.detach(), loc["labels"])
        info.update(
            {
                "loss/edit": l_edit.item(),
                "loss/loc": l_loc.item(),
                "loss/total": l_total.item(),
                "loss/total_edit": l_total_edit.item(),
                "edit/acc": post_edit["acc"].item(),
                "edit/acc_tok": post_edit["acc_tok"].item(),
                "edit/log_prob": post_edit["log_prob"].item(),
                "edit/prob": post_edit["prob"].item(),
                # Locality accuracy as the original's: whole sequences (a whole answer on qa); per token beside it.
                "acc/pre": pre_loc["acc"].item(),
                "acc/post": post_loc["acc"].item(),
                "acc_tok/pre": pre_loc["acc_tok"].item(),
                "acc_tok/post": post_loc["acc_tok"].item(),
                "nll/pre": pre_loc["nll"].item(),
                "nll/post": post_loc["nll"].item(),
                "time/edit": edit_time,
            }
        )
        if not editor.is_classifier:  # token-weighted perplexity (StatAverager); meaningless for one logit
            info.update(
                {
                    "nll_sum/pre": pre_loc["nll_sum"].item(),
                    "nll_sum/post": post_loc["nll_sum"].item(),
                    "n_tokens/pre": pre_loc["n_tokens"].item(),
                    "n_tokens/post": post_loc["n_tokens"].item(),
                }
            )
        if l_base is not None:
            info["loss/base"] = l_base.item()
        if pre_edit is not None:
            info["edit/acc_pre"] = pre_edit["acc"].item()
            info["edit/log_prob_pre"] = pre_edit["log_prob"].item()
        for p in editor.step_size_parameters():
            info.update({f"lr/lr{i}": lr.item() for i, lr in enumerate(p.detach().reshape(-1))})
        return info

    def _edit_losses(
        self, batch: dict, pre_loc_logits: torch.Tensor, training: bool, lower: Optional[LowerBlocks] = None
    ) -> dict:
        """The differentiable part of an edit step: the edit, then the losses of the edited model.

        Returns the total loss under "loss" with what the metrics need. Under torchrun this is the forward of the
        module DDP wraps (distributed.EditStep). ``lower``: the lower blocks recorded in the pre-edit locality pass,
        replayed in the post-edit one.
        """
        cfg = self.config
        loc, outer = batch["loc"], batch["edit_outer"]
        loc_mask = loc.get("decoder_attention_mask", loc["attention_mask"])

        start = time.perf_counter()
        with record_function("step/edit"):
            edited, info = self.editor.edit(batch["edit_inner"], batch.get("cond"))
        edit_time = time.perf_counter() - start

        with torch.set_grad_enabled(training), activation_checkpointing(edited.model, self._checkpointed_blocks()):
            with record_function("step/post_edit_equivalence"):
                post_edit = edited.loss_with(outer, {})
            with record_function("step/post_edit_locality"):
                with lower.replay(edited.weights) if lower else contextlib.nullcontext():
                    post_loc_logits = edited(**model_inputs(loc))
            l_edit = post_edit["nll"]
            l_loc = kl_loc_loss(pre_loc_logits, post_loc_logits, loc_mask)
            l_total_edit = cfg.cedit * l_edit + cfg.cloc * l_loc
            l_train, l_total = l_total_edit, l_total_edit
            # An editor that also trains the base model (ENN's train_base) adds its own term on the locality inputs:
            # unweighted in the gradient, cbase-weighted in the logged total, as in the original.
            l_base = self.editor.base_loss(model_inputs(loc), loc_mask) if training else None
            if l_base is not None:
                l_train = l_total_edit + l_base
                l_total = l_total_edit + cfg.cbase * l_base
        return {
            "loss": l_train,
            "l_total": l_total,
            "l_total_edit": l_total_edit,
            "l_base": l_base,
            "l_edit": l_edit,
            "l_loc": l_loc,
            "post_edit": post_edit,
            "post_loc_logits": post_loc_logits,
            "info": info,
            "edit_time": edit_time,
        }

    def _lower_blocks(self) -> Optional[LowerBlocks]:
        """The blocks below the edits, reused between the locality passes (``speed.reuse_lower_blocks``)."""
        if not self.config.speed.reuse_lower_blocks:
            return None
        if self._lower is None or self._lower.model is not self.editor.model:
            self._lower = LowerBlocks(self.editor.model, self.config.model.inner_params)
        return self._lower if self._lower.blocks else None

    def _checkpointed_blocks(self) -> list:
        """The blocks whose activations are recomputed in the backward pass (activation_checkpointing=True)."""
        if not self.config.activation_checkpointing:
            return []
        if not hasattr(self, "_blocks"):
            self._blocks = grad_blocks(self.editor.model, self.config.model.inner_params)
        return self._blocks

    def _skip_nonfinite(self) -> None:
        """Count a skipped step; too many in a row stop training."""
        self.n_skipped += 1
        self.consecutive_nonfinite += 1
        LOG.warning("Step %d: non-finite loss or gradient, step skipped (%d so far).", self.step, self.n_skipped)
        if self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive training steps (up to step {self.step + 1}) had "
                f"non-finite losses or gradients (max_nonfinite_steps={self.config.max_nonfinite_steps}); "
                f"stopping. Lower the editor's rates ({self.config.alg}.lr and the like), check cedit / cloc, or raise "
                f"max_nonfinite_steps."
            )

    def _sync_due(self) -> bool:
        """The coming step ends a gradient accumulation: DDP all-reduces in its backward pass."""
        acc, w = self.config.accumulate_bs, self.dist.world_size
        return (self.step + w) // acc != self.step // acc

    def _backward_ddp(self, loss: torch.Tensor) -> None:
        """loss.backward() through DDP (all-reduce on the step that ends an accumulation, no_sync before).

        Skipping is agreed: when any rank's loss is non-finite, every rank drops this step's contribution; a
        non-finite all-reduced gradient (identical on all ranks) drops the whole accumulation.
        """
        params = [p for p in self.editor.outer_parameters() if p.requires_grad]
        sync = self._sync_due()
        if distributed.any_rank(not bool(torch.isfinite(loss))):
            if sync:  # the ranks still all-reduce what they accumulated before this step: a zero-gradient backward
                sum(p.sum() * 0.0 for p in params).backward()
            self._skip_nonfinite()
            return
        (loss * distributed.per_rank_loss_scale(self.config, self.dist.world_size)).backward()
        if sync and not all_finite(p.grad for p in params):
            for p in params:
                p.grad = None
            self._skip_nonfinite()
            return
        self.consecutive_nonfinite = 0

    def _backward(self, loss: torch.Tensor) -> None:
        """Accumulate d(loss)/d(outer params); a step with non-finite loss or gradients is skipped and counted."""
        if self._ddp is not None:
            self._backward_ddp(loss)
            return
        params = [p for p in self.editor.outer_parameters() if p.requires_grad]
        grads = None
        if torch.isfinite(loss):
            grads = torch.autograd.grad(loss / self.config.accumulate_bs, params, allow_unused=True)
        if grads is None or not all_finite(grads):
            self._skip_nonfinite()
            return
        self.consecutive_nonfinite = 0
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

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
    def validate(
        self,
        steps: Optional[int] = None,
        desc: str = "validate",
        editor: Optional[EditableModel] = None,
        interruptible: bool = False,
    ):
        n_batches = max(1, len(self.val_set) // self.config.data.n_edits)
        steps = min(steps or self.config.val_steps, n_batches)
        saved = self.editor
        if editor is not None:
            self.editor = editor
        try:
            averager = StatAverager("_val")
            gen = self.val_set.edit_generator(self.config.val_batch_size, n=steps)
            start = time.perf_counter()
            rank, world = self.dist.rank, self.dist.world_size
            mine = []  # (batch index, metrics) of the batches this rank evaluates: rank, rank+W, ...
            bar = tqdm(total=steps, desc=desc, leave=False, disable=self.config.silent or not self.dist.is_main)
            for i, batch in enumerate(gen):
                if i % world == rank:
                    mine.append((i, self.edit_step(batch, training=False)))
                if i % world == world - 1 or i == steps - 1:  # every rank is at the same point here
                    bar.update(min(world, i % world + 1))
                    if interruptible and self._stop_requested():
                        bar.close()
                        raise _StopRequested()
            bar.close()
            for _, info in sorted(sum(distributed.gather_objects(mine), [])):  # the single-process order
                averager.add(info)
            stats = averager.summary()
            stats["eval_time/elapsed"] = time.perf_counter() - start
            stats["eval_time/n_edits"] = steps * self.config.data.n_edits
        finally:
            self.editor = saved
        return stats

    # -- checkpoints ----------------------------------------------------------------------
    def _meta(self) -> str:
        if not hasattr(self, "_base_identity"):
            self._base_identity = base_model_identity(self.editor.model, self.config.model.inner_params)
        return checkpoint_meta(self.config, self._base_identity)

    def _write(self, obj: Optional[dict], name: str) -> None:
        write_checkpoint(obj, os.path.join(self.ckpt_dir, name), self.step, self.run_dir)

    def save_checkpoint(self, stats: Dict[str, float]) -> None:
        """The best editor so far (checkpoints/best.pt): what archive= and the final evaluation load."""
        if not self.config.save:
            return
        if not self.dist.is_main:  # the editor is the same on every rank: rank 0 writes it
            self._write(None, BEST_NAME)
            return
        self._write(
            {
                "editor": self.editor.state_dict(),
                "step": self.step,
                "val_stats": {k: float(v) for k, v in stats.items()},
                "stopper": self.stopper.state_dict(),
                "meta": self._meta(),
            },
            BEST_NAME,
        )

    def save_last(self) -> None:
        """Everything needed to continue exactly where training is now (checkpoints/last.pt)."""
        if not self.config.save:
            return
        # Collective parts first (every rank takes part): the accumulated gradients and each rank's RNG state.
        grads = distributed.mean_gradients(self.editor.named_parameters())
        rng_ranks = distributed.gather_objects(rng_state())
        if not self.dist.is_main:
            self._write(None, LAST_NAME)
            self._last_saved_step = self.step
            return
        self._write(
            {
                "editor": self.editor.state_dict(),
                "opt": self.opt.state_dict() if self.opt is not None else {},
                "lr_opt": self.lr_opt.state_dict() if self.lr_opt is not None else {},
                "grads": grads,
                "step": self.step,
                "stopper": self.stopper.state_dict(),
                "trainer": {
                    "n_skipped": self.n_skipped,
                    "consecutive_nonfinite": self.consecutive_nonfinite,
                    "last_val_step": self.last_val_step,
                    "val_history": self.val_history,
                    "train_seconds": self.train_seconds,
                    "finished": self.finished,
                    "batches_drawn": self.step,  # one training batch per step
                },
                "rng": rng_ranks[0],
                "rng_ranks": rng_ranks if self.dist.enabled else [],
                "meta": self._meta(),
            },
            LAST_NAME,
        )
        self._last_saved_step = self.step

    # -- signals --------------------------------------------------------------------------
    def _stop_on_signals(self):
        """SIGINT / SIGTERM ask training to stop after the current step; a second one stops at once."""

        def first(signum):
            self._stop_signal = signum
            what = f"{signal.Signals(signum).name} received: stopping after the current step and writing"
            LOG.warning("%s checkpoints/%s (send it again to stop at once).", what, LAST_NAME)

        return graceful_stop(first, lambda: self._stop_signal is not None)

    # -- the loop -------------------------------------------------------------------------
    def _train_batches(self):
        """The training batches from the one after the last drawn (``self.step`` batches drawn so far)."""
        make = self.train_set.edit_generator
        if "start" in inspect.signature(make).parameters:
            return make(self.config.batch_size, start=self.step)
        gen = make(self.config.batch_size)
        for _ in range(self.step):
            next(gen)
        return gen

    def _crossed(self, interval: int) -> bool:
        """The last step reached a multiple of ``interval`` (a step of N processes advances by N batches)."""
        return self.step // interval != (self.step - self.dist.world_size) // interval

    def _stop_requested(self) -> bool:
        """A stop signal arrived (on any rank: all ranks then stop at the same step)."""
        if self.dist.enabled:
            signum = distributed.max_int(self._stop_signal or 0)
            if signum and self._stop_signal is None:
                self._stop_signal = signum
        return self._stop_signal is not None

    def _validation_due(self, out_of_time: bool = False) -> bool:
        cfg = self.config
        due = self._crossed(cfg.val_interval) or self.step >= cfg.max_iters or out_of_time
        return self.step > 0 and due and self.last_val_step != self.step

    def train(self) -> None:
        cfg = self.config
        if self.finished:
            return
        averager = StatAverager()
        start = time.perf_counter() - self.train_seconds
        interval = cfg.checkpoint_interval or cfg.val_interval
        self._last_saved_step = self.step
        quiet = cfg.silent or not self.dist.is_main
        bar = tqdm(total=cfg.max_iters, initial=self.step, desc="train", disable=quiet, dynamic_ncols=True)
        with self._stop_on_signals():
            try:
                stop = None
                if self._validation_due() and self._validate_and_checkpoint():  # a resumed run's pending one
                    stop = "early_stop"
                gen = distributed.rank_stream(self._train_batches(), self.dist.rank, self.dist.world_size)
                while not stop and self.step < cfg.max_iters and not self._stop_requested():
                    stop = self._train_step(next(gen), averager, start, interval)
                    bar.update(self.dist.world_size)
                    if self._crossed(cfg.log_interval):
                        stats = averager.summary()
                        averager = StatAverager()
                        bar.set_postfix({"loss": f"{stats['loss/total_edit']:.3f}", "ES": f"{stats['edit/acc']:.2f}"})
                        LOG.info("step %d: %s", self.step, format_stats(stats))
                        self._log(stats, self.step)
                # Over when early stopping said so or max_iters is reached; not after max_time (resume continues).
                self.finished = stop == "early_stop" or self.step >= cfg.max_iters
            except _StopRequested:
                pass
            except NonFiniteLossError:
                self.train_seconds = time.perf_counter() - start
                self.consecutive_nonfinite = 0  # a resumed run (say with a lower lr) starts a fresh count
                self.save_last()  # the editor is still finite: keep the work, e.g. to resume with a lower lr
                raise
            finally:
                bar.close()
            self.train_seconds = time.perf_counter() - start
            if self._stop_signal is not None:
                name = signal.Signals(self._stop_signal).name
                if not cfg.save:
                    raise TrainingInterrupted(
                        f"{name}: training stopped at step {self.step}; save=False, so nothing was kept.",
                        self._stop_signal,
                    )
                self.save_last()
                raise TrainingInterrupted(
                    f"{name}: training stopped at step {self.step}; wrote {os.path.join(self.ckpt_dir, LAST_NAME)}. "
                    f"Continue with resume={self.run_dir} (and the same settings).",
                    self._stop_signal,
                )
        self.save_last()
        LOG.info("Training done: %d steps in %.0fs, %d skipped.", self.step, self.train_seconds, self.n_skipped)

    def _train_step(self, batch: dict, averager: StatAverager, start: float, interval: int) -> Optional[str]:
        """One training step and what follows it; "early_stop" or "out_of_time" when training should stop."""
        cfg = self.config
        # 1. one edit and its losses, gradients accumulated into the editor (on N processes: N batches at once,
        #    and the normalisation statistics merged over them)
        before = distributed.stats_snapshot(self.editor)
        log_due = (self.step + self.dist.world_size) // cfg.log_interval != self.step // cfg.log_interval
        averager.add(self.edit_step(batch, training=True, diagnostics=log_due))
        distributed.merge_running_stats(self.editor, before)
        self.step += self.dist.world_size
        # 2. an optimiser step every accumulate_bs edits
        if self._crossed(cfg.accumulate_bs):
            averager.add(self._optimizer_step())
        out_of_time = cfg.max_time is not None and time.perf_counter() - start >= cfg.max_time
        if cfg.max_time is not None:
            out_of_time = distributed.any_rank(out_of_time)
        # 3. validation, best checkpoint, early stopping
        self.train_seconds = time.perf_counter() - start
        if self._validation_due(out_of_time) and self._validate_and_checkpoint():
            return "early_stop"
        # 4. the resume point
        if self._crossed(interval) and self._last_saved_step != self.step:
            self.train_seconds = time.perf_counter() - start
            self.save_last()
        if out_of_time:
            LOG.info("max_time=%ss reached after %d steps.", cfg.max_time, self.step)
            return "out_of_time"
        return None

    def _validate_and_checkpoint(self) -> bool:
        """Validate; save a new best. True when early stopping says to stop."""
        stats = self.validate(interruptible=True)
        self.last_val_step = self.step
        point = {"step": self.step, "seconds": self.train_seconds}
        self.val_history.append({**point, **{k: float(v) for k, v in stats.items()}})
        LOG.info("validation at step %d: %s", self.step, format_stats(stats))
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
        if not self.editor.needs_training:
            LOG.info("alg=%s has nothing to train: evaluating it directly.", cfg.alg)
            self.save_checkpoint({})  # its settings, so that python -m edit --archive <run> takes this run too
        elif not cfg.eval_only:
            self.train()
            best = os.path.join(self.ckpt_dir, BEST_NAME)
            if cfg.save and distributed.broadcast_object(os.path.exists(best)):  # rank 0 reads it, then shares it
                if self.dist.is_main:
                    ckpt = read_checkpoint(best)
                    self.editor.load_state_dict(ckpt["editor"])
                    LOG.info("Reloaded the best checkpoint (step %d).", ckpt["step"])
                distributed.broadcast_module(self.editor)
        if not cfg.eval.final_eval:
            return {}

        steps = cfg.eval.final_steps or cfg.val_steps
        results = self.validate(steps, desc="final evaluation")
        report = {"results": results}
        if cfg.eval.compare_untrained and self.editor.needs_training:
            untrained = self.make_editor()
            distributed.broadcast_module(untrained)  # the same untrained editor on every rank
            untrained.copy_statistics_from(self.editor)  # data statistics, e.g. an input normalisation
            report["untrained"] = self.validate(steps, desc="untrained editor", editor=untrained)
        report["train"] = {
            "steps": self.step,
            "skipped_steps": self.n_skipped,
            "seconds": self.train_seconds,
            "best_step": self.stopper.best_step,
            "validations": self.val_history,  # the learning curve: every validation during training
        }
        report["memory"] = peak_memory_mb()
        report["config"] = OmegaConf.to_container(cfg, resolve=True)

        out_dir = cfg.results_dir or self.run_dir
        path = os.path.join(os.path.expanduser(out_dir), "results.json")
        if not self.dist.is_main:  # every rank holds the same report; rank 0 writes it
            return report
        write_json(report, path)
        self._log(results, self.step + 1)
        LOG.info("\n%s", summary_table(report, cfg.task))
        LOG.info("Wrote %s", path)
        if self.wandb is not None:
            self.wandb.finish()
        return report
