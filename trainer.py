"""Training an editor: the loop around the editor's training step (DESIGN: L = c_edit * L_e + c_loc * L_loc).

One training step: draw a batch (edits + locality; ``batches_per_step`` of them for an editor whose step spans a
sequence), ask the editor for its losses on it (``editor.meta_loss``, see ``meta_loss.py``), back-propagate them
into the editor (``editor.meta_backward`` through :meth:`EditTrainer._backward`), and every ``accumulate_bs`` steps
step the optimisers. Every ``val_interval`` steps validation keeps the best editor (``checkpoints/best.pt``);
``checkpoints/last.pt`` keeps the resume point (``train_state.py``). The final evaluation is ``evaluation.py``'s.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import signal
import time
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.profiler import record_function
from tqdm import tqdm

import distributed
from blocks import LowerBlocks, grad_blocks
from checkpoints import LAST_NAME
from editable_model import EditableModel
from errors import NonFiniteLossError, TrainingInterrupted
from memory import activation_checkpointing
from meta_loss import StepContext, StepLosses
from ranges import YEAR_SECONDS, duration
from reporting import format_stats, init_wandb
from signals import graceful_stop
from train_state import Optimisers, RunCheckpoints, TrainState
from utils import EarlyStopper, StatAverager, all_finite, seed_everything, to_device

LOG = logging.getLogger(__name__)
# Training steps timed before a schedule too long to finish is warned of (_warn_of_a_long_schedule).
RATE_STEPS = 10


class _StopRequested(Exception):
    """Raised inside validation when a stop signal arrives, to checkpoint without finishing it."""


def grouped(batches: Iterator, k: int) -> Iterator:
    """The batches one per step (``k`` = 1) or in lists of ``k``, one list per step (``batches_per_step``)."""
    if k == 1:
        return batches
    return iter(lambda: list(itertools.islice(batches, k)), [])


class EditTrainer:
    def __init__(self, make_editor: Callable[[], EditableModel], config, train_set, val_set, run_dir: str):
        self.config = config
        self.dist = distributed.env()  # rank and world size; a single process unless launched by torchrun
        distributed.check_world_size(config, self.dist.world_size)
        self.make_editor = make_editor
        self.editor = make_editor()
        self.train_set, self.val_set = train_set, val_set
        self.run_dir = run_dir
        self.device = next(iter(self.editor.model.parameters())).device
        self.state = TrainState(EarlyStopper(config.early_stop_patience, config.early_stop_key))
        self.checkpoints = RunCheckpoints(config, run_dir)
        self._stop_signal: Optional[int] = None
        self._last_saved_step = 0

        # The optimisers: the outer parameters at outer_lr(); learned step sizes at step_size_lr() in their own
        # (unless the editor trains them with the others: step_size_lr() None).
        editor = self.editor
        step_params = editor.step_size_parameters()
        if step_params and editor.step_size_lr() is None:
            step_params = []
        main_params = [p for p in editor.outer_parameters() if id(p) not in {id(q) for q in step_params}]
        opt_class = getattr(torch.optim, config.opt)
        fused = config.speed.fused_optimizer and "fused" in inspect.signature(opt_class).parameters
        options = {"fused": True} if fused else {}
        self.opt = opt_class(main_params, lr=editor.outer_lr(), **options) if main_params else None
        self.lr_opt = opt_class(step_params, lr=editor.step_size_lr()) if step_params else None

        if config.resume is not None:
            self.checkpoints.resume(config.resume, editor, self._optimisers(), self.state)
        elif config.archive is not None:
            self.checkpoints.load_archive(config.archive, editor)

        # Under torchrun: DDP over the editor's parameters (it starts every rank from rank 0's editor).
        wrap = self.dist.enabled and editor.needs_training  # nothing to train: no DDP wrapper
        self._lower: Optional[LowerBlocks] = None  # built on first use (_lower_blocks)
        self._ddp = distributed.wrap(editor, self.device) if wrap else None
        if self.dist.enabled and config.resume is None:
            seed_everything(config.seed + self.dist.rank)  # rank 0 keeps the single-process stream
        self.wandb = init_wandb(self.config, self.run_dir) if self.dist.is_main else None

    def _optimisers(self) -> Optimisers:
        """The optimisers by their key in last.pt, each with the rate the configuration gives it now."""
        return {
            "opt": (self.opt, self.editor.outer_lr() if self.opt is not None else None),
            "lr_opt": (self.lr_opt, self.editor.step_size_lr() if self.lr_opt is not None else None),
        }

    # -- the loop -------------------------------------------------------------------------
    def train(self) -> None:
        cfg, state = self.config, self.state
        if state.finished:
            return
        averager = StatAverager()
        start = time.perf_counter() - state.train_seconds
        interval = cfg.checkpoint_interval or cfg.val_interval
        self._last_saved_step = state.step
        quiet = cfg.silent or not self.dist.is_main
        bar = tqdm(total=cfg.max_iters, initial=state.step, desc="train", disable=quiet, dynamic_ncols=True)
        with self._stop_on_signals():
            try:
                stop = None
                if self._validation_due() and self._validate_and_checkpoint():  # a resumed run's pending one
                    stop = "early_stop"
                steps = self._train_steps()
                first_step, first_time = state.step, time.perf_counter()
                while not stop and state.step < cfg.max_iters and not self._stop_requested():
                    stop = self._train_step(next(steps), averager, start, interval)
                    bar.update(self.dist.world_size)
                    if state.step - first_step == RATE_STEPS * self.dist.world_size:
                        self._warn_of_a_long_schedule(state.step - first_step, time.perf_counter() - first_time)
                    if self._crossed(cfg.log_interval):
                        stats = averager.summary()
                        averager = StatAverager()
                        bar.set_postfix({"loss": f"{stats['loss/total_edit']:.3f}", "ES": f"{stats['edit/acc']:.2f}"})
                        LOG.info("step %d: %s", state.step, format_stats(stats))
                        self.log(stats, state.step)
                # Over when early stopping said so or max_iters is reached; not after max_time (resume continues).
                state.finished = stop == "early_stop" or state.step >= cfg.max_iters
            except _StopRequested:
                pass
            except NonFiniteLossError:
                state.train_seconds = time.perf_counter() - start
                state.consecutive_nonfinite = 0  # a resumed run (say with a lower lr) starts a fresh count
                self.save_last()  # the editor is still finite: keep the work, e.g. to resume with a lower lr
                raise
            finally:
                bar.close()
            state.train_seconds = time.perf_counter() - start
            if self._stop_signal is not None:
                self._interrupted()
        self.save_last()
        LOG.info("Training done: %d steps in %.0fs, %d skipped.", state.step, state.train_seconds, state.n_skipped)

    def _warn_of_a_long_schedule(self, steps: int, seconds: float) -> None:
        """After the first steps: a warning when the steps left to max_iters, at the rate of those steps, would take
        over a year and no max_time bounds the run (only early stopping could end it sooner)."""
        cfg = self.config
        left = (cfg.max_iters - self.state.step) * seconds / steps
        if cfg.max_time is None and self.dist.is_main and left > YEAR_SECONDS:
            LOG.warning(
                "max_iters=%d: at the %.3g steps/s of the first %d steps, the run would take %s unless early stopping "
                "(early_stop_patience=%d) ends it; set max_time=<seconds> or a smaller max_iters.",
                cfg.max_iters,
                steps / seconds,
                steps,
                duration(left),
                cfg.early_stop_patience,
            )

    def _train_step(self, batch, averager: StatAverager, start: float, interval: int) -> Optional[str]:
        """One training step and what follows it; "early_stop" or "out_of_time" when training should stop."""
        cfg, state = self.config, self.state
        # 1. the editor's losses on the batch, their gradients accumulated into the editor (on N processes: N
        #    batches at once, and the normalisation statistics merged over them)
        before = distributed.stats_snapshot(self.editor)
        log_due = (state.step + self.dist.world_size) // cfg.log_interval != state.step // cfg.log_interval
        averager.add(self.edit_step(batch, training=True, diagnostics=log_due))
        distributed.merge_running_stats(self.editor, before)
        state.step += self.dist.world_size
        # 2. an optimiser step every accumulate_bs edits
        if self._crossed(cfg.accumulate_bs):
            averager.add(self._optimizer_step())
        out_of_time = cfg.max_time is not None and time.perf_counter() - start >= cfg.max_time
        if cfg.max_time is not None:
            out_of_time = distributed.any_rank(out_of_time)
        # 3. validation, best checkpoint, early stopping
        state.train_seconds = time.perf_counter() - start
        if self._validation_due(out_of_time) and self._validate_and_checkpoint():
            return "early_stop"
        # 4. the resume point
        if self._crossed(interval) and self._last_saved_step != state.step:
            state.train_seconds = time.perf_counter() - start
            self.save_last()
        if out_of_time:
            LOG.info("max_time=%ss reached after %d steps.", cfg.max_time, state.step)
            return "out_of_time"
        return None

    # -- one step of the editor ---------------------------------------------------------------
    def edit_step(self, batch, training: bool, diagnostics: bool = False) -> Dict[str, float]:
        """One step of the editor (its ``meta_loss`` on ``batch``); in training, its gradients accumulated into the
        editor. ``diagnostics``: also the figures that are only logged (see ``speed.grad_stats_on_log_steps``)."""
        editor = self.editor
        editor.train(training)
        batch = [to_device(b, self.device) for b in batch] if isinstance(batch, list) else to_device(batch, self.device)
        diagnostics = diagnostics or not self.config.speed.grad_stats_on_log_steps
        step = StepContext(training, diagnostics, self._lower_blocks(), self._checkpointing)
        # 1. the edit and the losses of the edited model (meta_loss.edit_meta_loss, unless the editor has its own)
        if training and self._ddp is not None:  # through DDP, which then averages the gradients over ranks
            with distributed.optional_no_sync(self._ddp, self._sync_due()):
                losses = self._ddp(batch, step)
        else:
            losses = editor.meta_loss(batch, step)
        # 2. their gradients, accumulated into the editor's outer parameters (self._backward)
        if training:
            with record_function("step/backward"):
                editor.meta_backward(losses, self._backward)
        # 3. what is logged
        return self._step_metrics(losses, batch[-1] if isinstance(batch, list) else batch)

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
        self.state.consecutive_nonfinite = 0
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

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
        self.state.consecutive_nonfinite = 0

    def _skip_nonfinite(self) -> None:
        """Count a skipped step; too many in a row stop training."""
        cfg, state = self.config, self.state
        state.n_skipped += 1
        state.consecutive_nonfinite += 1
        LOG.warning("Step %d: non-finite loss or gradient, step skipped (%d so far).", state.step, state.n_skipped)
        if state.consecutive_nonfinite >= cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive training steps (up to step {state.step + 1}) had "
                f"non-finite losses or gradients (max_nonfinite_steps={cfg.max_nonfinite_steps}); stopping. Lower "
                f"the editor's rates ({cfg.alg}.lr and the like), check cedit / cloc, or raise max_nonfinite_steps."
            )

    def _sync_due(self) -> bool:
        """The coming step ends a gradient accumulation: DDP all-reduces in its backward pass."""
        acc, w, step = self.config.accumulate_bs, self.dist.world_size, self.state.step
        return (step + w) // acc != step // acc

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

    def _step_metrics(self, losses: StepLosses, batch: dict) -> Dict[str, float]:
        """The figures of one step: its losses, the edit's success, the drawdown on the locality inputs."""
        editor, labels = self.editor, batch["loc"]["labels"]
        post_edit, pre_edit = losses.post_edit, losses.pre_edit
        with torch.no_grad():
            pre_loc = editor.loc_loss_fn(losses.pre_loc_logits, labels)
            post_loc = editor.loc_loss_fn(losses.post_loc_logits.detach(), labels)
        info = losses.info
        info.update(
            {
                "loss/edit": losses.edit.item(),
                "loss/loc": losses.loc.item(),
                "loss/total": losses.total.item(),
                "loss/total_edit": losses.total_edit.item(),
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
                "time/edit": losses.edit_time,
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
        if losses.base is not None:
            info["loss/base"] = losses.base.item()
        if pre_edit is not None:
            info["edit/acc_pre"] = pre_edit["acc"].item()
            info["edit/log_prob_pre"] = pre_edit["log_prob"].item()
        for p in editor.step_size_parameters():
            info.update({f"lr/lr{i}": lr.item() for i, lr in enumerate(p.detach().reshape(-1))})
        return info

    def _lower_blocks(self) -> Optional[LowerBlocks]:
        """The blocks below the edits, reused between the locality passes (``speed.reuse_lower_blocks``)."""
        if not self.config.speed.reuse_lower_blocks:
            return None
        if self._lower is None or self._lower.model is not self.editor.model:
            self._lower = LowerBlocks(self.editor.model, self.config.model.inner_params)
        return self._lower if self._lower.blocks else None

    def _checkpointing(self, model: torch.nn.Module):
        """A context in which ``model``'s blocks recompute their activations in the backward pass
        (``activation_checkpointing=True``)."""
        if not self.config.activation_checkpointing:
            return activation_checkpointing(model, [])
        if not hasattr(self, "_blocks"):
            self._blocks = grad_blocks(self.editor.model, self.config.model.inner_params)
        return activation_checkpointing(model, self._blocks)

    # -- validation -----------------------------------------------------------------------
    def validate(
        self,
        steps: Optional[int] = None,
        desc: str = "validate",
        editor: Optional[EditableModel] = None,
        interruptible: bool = False,
    ):
        per_step = self.editor.batches_per_step
        n_batches = max(1, len(self.val_set) // self.config.data.n_edits // per_step)
        steps = min(steps or self.config.val_steps, n_batches)
        saved, fresh = self.editor, {}
        if editor is not None:
            self.editor = editor
        try:
            averager = StatAverager("_val")
            gen = grouped(self.val_set.edit_generator(self.config.val_batch_size, n=steps * per_step), per_step)
            start = time.perf_counter()
            rank, world = self.dist.rank, self.dist.world_size
            mine = []  # (batch index, metrics) of the batches this rank evaluates: rank, rank+W, ...
            bar = tqdm(total=steps, desc=desc, leave=False, disable=self.config.silent or not self.dist.is_main)
            fresh = self.editor.lifelong_state()  # each validation edit starts from it, and it is left as it was
            for i, batch in enumerate(gen):
                if i % world == rank:
                    self.editor.load_lifelong_state(fresh)
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
            stats["eval_time/n_edits"] = steps * per_step * self.config.data.n_edits  # every batch of a sequence
        finally:
            if fresh:
                self.editor.load_lifelong_state(fresh)
            self.editor = saved
        return stats

    def _validate_and_checkpoint(self) -> bool:
        """Validate; save a new best. True when early stopping says to stop."""
        state = self.state
        stats = self.validate(interruptible=True)
        state.last_val_step = state.step
        point = {"step": state.step, "seconds": state.train_seconds}
        state.val_history.append({**point, **{k: float(v) for k, v in stats.items()}})
        LOG.info("validation at step %d: %s", state.step, format_stats(stats))
        self.log(stats, state.step)
        if state.stopper.update(state.step, stats):
            self.checkpoints.write_best(self.editor, state, stats)
        if state.stopper.should_stop():
            cfg = self.config
            LOG.info("No improvement in %s for %d steps: stopping.", cfg.early_stop_key, cfg.early_stop_patience)
            return True
        return False

    # -- checkpoints, signals, schedule, logging -------------------------------------------
    def save_last(self) -> None:
        """The resume point (checkpoints/last.pt, ``train_state.RunCheckpoints.write_last``)."""
        self.checkpoints.write_last(self.editor, self._optimisers(), self.state)
        self._last_saved_step = self.state.step

    def _stop_on_signals(self):
        """SIGINT / SIGTERM ask training to stop after the current step; a second one stops at once."""

        def first(signum):
            self._stop_signal = signum
            what = f"{signal.Signals(signum).name} received: stopping after the current step and writing"
            LOG.warning("%s checkpoints/%s (send it again to stop at once).", what, LAST_NAME)

        return graceful_stop(first, lambda: self._stop_signal is not None)

    def _interrupted(self) -> None:
        """After a stop signal: write the resume point and raise TrainingInterrupted."""
        name, step = signal.Signals(self._stop_signal).name, self.state.step
        if not self.config.save:
            raise TrainingInterrupted(
                f"{name}: training stopped at step {step}; save=False, so nothing was kept.", self._stop_signal
            )
        self.save_last()
        raise TrainingInterrupted(
            f"{name}: training stopped at step {step}; wrote {os.path.join(self.checkpoints.dir, LAST_NAME)}. "
            f"Continue with resume={self.run_dir} (and the same settings).",
            self._stop_signal,
        )

    def _train_steps(self) -> Iterator:
        """This rank's training steps, from the one after the last taken: the stream's batches grouped into steps
        (``batches_per_step`` each) before they are dealt out, rank r taking steps r, r+W, r+2W, ... So each rank
        trains on whole steps, a sequence of ``batches_per_step`` consecutive batches as a single process draws
        it, and W ranks take the W steps one process would take next."""
        steps = grouped(self._train_batches(), self.editor.batches_per_step)
        return distributed.rank_stream(steps, self.dist.rank, self.dist.world_size)

    def _train_batches(self):
        """The training batches from the one after the last drawn (``batches_per_step`` per step)."""
        drawn = self.state.step * self.editor.batches_per_step
        make = self.train_set.edit_generator
        if "start" in inspect.signature(make).parameters:
            return make(self.config.batch_size, start=drawn)
        gen = make(self.config.batch_size)
        for _ in range(drawn):
            next(gen)
        return gen

    def _crossed(self, interval: int) -> bool:
        """The last step reached a multiple of ``interval`` (a step of N processes advances by N batches)."""
        step = self.state.step
        return step // interval != (step - self.dist.world_size) // interval

    def _stop_requested(self) -> bool:
        """A stop signal arrived (on any rank: all ranks then stop at the same step)."""
        if self.dist.enabled:
            signum = distributed.max_int(self._stop_signal or 0)
            if signum and self._stop_signal is None:
                self._stop_signal = signum
        return self._stop_signal is not None

    def _validation_due(self, out_of_time: bool = False) -> bool:
        cfg, step = self.config, self.state.step
        due = self._crossed(cfg.val_interval) or step >= cfg.max_iters or out_of_time
        return step > 0 and due and self.state.last_val_step != step

    def log(self, stats: Dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(stats, step=step)

    def finish_logging(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
