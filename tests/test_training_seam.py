"""The training step is the editor's (``EditableModel.meta_loss``, ``meta_backward``, ``batches_per_step``): editors
that train differently from MEND train, checkpoint and resume through the unchanged trainer.

Two toy editors stand for the editors to come: one back-propagates in two stages, as MALMEN does (its edit is applied
detached; the gradient first reaches the edited weights, then goes from there into the editor through the cached
inner gradients), and one whose meta-step is a sequence of two batches edited one after another into a drifting
model (a lifelong editor). Both edit as :class:`StepSizeEditor` does: one gradient step per edited weight with a
learned step size.
"""

from __future__ import annotations

import itertools
import signal

import pytest
import torch
import torch.nn as nn
from conftest import TINY, SyntheticEdits, make_config

import utils
from checkpoints import read_checkpoint
from editable_model import EditableModel
from errors import TrainingInterrupted
from meta_loss import StepContext, StepLosses, edit_meta_loss
from trainer import EditTrainer

SETTINGS = {
    "accumulate_bs": 2,
    "max_iters": 6,
    "val_interval": 100,
    "val_steps": 2,
    "log_interval": 2,
    "checkpoint_interval": 1,
    "eval.compare_untrained": False,
}


class StepSizeEditor(EditableModel):
    """W' = W - alpha_l * g_l: one step on the edit loss's gradient g_l (a constant), alpha_l learned."""

    def __init__(self, model, config, weights=None, alphas=None):
        super().__init__(model, config, weights)
        self.alphas = alphas if alphas is not None else nn.Parameter(torch.full((len(self.inner_params),), 20.0))

    def with_weights(self, weights):
        edited = type(self)(self.model, self.config, weights, self.alphas)
        edited.train(self.training)
        return edited

    def outer_parameters(self):
        return [self.alphas]

    def outer_lr(self):
        return 0.5

    def inner_gradients(self, batch):
        leaves = {n: self.current_weight(n).detach().requires_grad_(True) for n in self.inner_params}
        with torch.enable_grad():
            loss = self.loss_with(batch, leaves)["nll"]
            return torch.autograd.grad(loss, list(leaves.values()))

    def edit(self, batch, condition=None, diagnostics=False):
        grads = self.inner_gradients(batch)
        new = {n: self.current_weight(n) - self.alphas[i] * grads[i] for i, n in enumerate(self.inner_params)}
        return self.with_weights({**self.weights, **new}), {}


class TwoStageEditor(StepSizeEditor):
    """MALMEN's shape of training: the edit is applied as detached weights and the inner gradients are kept
    (``StepLosses.saved``); ``meta_backward`` takes the loss's gradient with respect to the edited weights (stage
    one), then back-propagates it into the step sizes through the kept gradients (stage two)."""

    def meta_loss(self, batch, step: StepContext) -> StepLosses:
        if not step.training:
            return super().meta_loss(batch, step)
        saved = {}

        def detached_edit(inner, condition=None, diagnostics=False):
            saved["grads"] = self.inner_gradients(inner)
            with torch.no_grad():
                new = {
                    n: self.current_weight(n) - self.alphas[i] * saved["grads"][i]
                    for i, n in enumerate(self.inner_params)
                }
            saved["leaves"] = {n: w.requires_grad_(True) for n, w in new.items()}
            return self.with_weights({**self.weights, **saved["leaves"]}), {}

        losses = edit_meta_loss(self, batch, step, edit=detached_edit)
        losses.saved.update(saved)
        return losses

    def meta_backward(self, losses, backward):
        self.stages = getattr(self, "stages", 0) + 1
        leaves, grads = losses.saved["leaves"], losses.saved["grads"]
        to_weights = torch.autograd.grad(losses.loss, list(leaves.values()))  # stage one: to the edited weights
        surrogate = sum((-self.alphas[i] * grads[i] * to_weights[i]).sum() for i in range(len(grads)))
        backward(surrogate)  # stage two: from the edited weights into the editor


class SequenceEditor(StepSizeEditor):
    """A meta-step over two batches: the second edit is made on the model the first one edited, and the step's
    loss is the mean of both edits' losses, each on the model as it was after that edit."""

    batches_per_step = 2

    def meta_loss(self, batches, step: StepContext) -> StepLosses:
        assert isinstance(batches, list) and len(batches) == 2
        self.handed = getattr(self, "handed", []) + [[b["edit_inner"]["input_ids"].tolist() for b in batches]]
        current, total = self, 0.0
        for batch in batches:
            made = {}

            def edit(inner, condition=None, diagnostics=False, editor=current, made=made):
                made["edited"], info = editor.edit(inner, condition, diagnostics=diagnostics)
                return made["edited"], info

            losses = edit_meta_loss(current, batch, step, edit=edit)
            total = total + losses.loss
            current = made["edited"]
        losses.loss = total / len(batches)
        return losses


def _trainer(cls, run_dir, model, **overrides):
    cfg = make_config("llama", **{**SETTINGS, **overrides})
    utils.seed_everything(cfg.seed)
    return EditTrainer(lambda: cls(model, cfg), cfg, SyntheticEdits(48, seed=0), SyntheticEdits(16, seed=1), run_dir)


def _stopped_then_resumed(cls, tmp_path, model, stop_after: int):
    """Train, stop (as on SIGTERM) after ``stop_after`` steps, resume from checkpoints/last.pt: the resumed trainer."""
    run_dir = str(tmp_path / "stopped")
    stopped = _trainer(cls, run_dir, model)
    step = stopped._train_step

    def step_then_signal(*args, **kwargs):
        out = step(*args, **kwargs)
        if stopped.state.step == stop_after:
            stopped._stop_signal = signal.SIGTERM
        return out

    stopped._train_step = step_then_signal
    with pytest.raises(TrainingInterrupted):
        stopped.train()
    last = read_checkpoint(str(tmp_path / "stopped" / "checkpoints" / "last.pt"))
    resumed = _trainer(cls, run_dir, model, resume=run_dir)
    resumed.train()
    return resumed, last


@pytest.fixture(scope="module")
def model():
    build, _, _ = TINY["llama"]
    return build()


def test_an_editor_that_backpropagates_in_two_stages_trains_as_the_one_stage_gradient(tmp_path, model):
    plain = _trainer(StepSizeEditor, str(tmp_path / "plain"), model)
    staged = _trainer(TwoStageEditor, str(tmp_path / "staged"), model)
    start = staged.editor.alphas.detach().clone()
    plain.train()
    staged.train()
    assert staged.editor.stages == 6  # its meta_backward ran on every training step
    assert staged.state.n_skipped == 0 and staged.state.val_history
    assert all(torch.isfinite(torch.tensor(v)) for v in staged.state.val_history[-1].values())
    assert (staged.editor.alphas - start).abs().min() > 1e-3  # the step sizes trained
    # the same gradient as differentiating the edit in one go: the two-stage editor ends where the plain one does
    torch.testing.assert_close(staged.editor.alphas, plain.editor.alphas, rtol=1e-5, atol=1e-6)


def test_a_two_stage_editor_resumes_where_it_stopped(tmp_path, model):
    straight = _trainer(TwoStageEditor, str(tmp_path / "straight"), model)
    straight.train()
    resumed, last = _stopped_then_resumed(TwoStageEditor, tmp_path, model, stop_after=3)  # mid-accumulation
    assert last["step"] == 3
    torch.testing.assert_close(resumed.editor.alphas, straight.editor.alphas, rtol=0, atol=0)


def test_an_editor_whose_step_spans_two_batches_gets_them_in_order_trains_and_resumes(tmp_path, model):
    straight = _trainer(SequenceEditor, str(tmp_path / "straight"), model)
    start = straight.editor.alphas.detach().clone()
    straight.train()
    # each step got the next two batches of the training stream
    stream = SyntheticEdits(48, seed=0).edit_generator(straight.config.batch_size)
    expected = [b["edit_inner"]["input_ids"].tolist() for b in itertools.islice(stream, 12)]
    assert straight.editor.handed[:6] == [expected[i : i + 2] for i in range(0, 12, 2)]
    assert straight.state.step == 6 and straight.state.n_skipped == 0
    assert (straight.editor.alphas - start).abs().min() > 1e-3
    assert all(torch.isfinite(torch.tensor(v)) for v in straight.state.val_history[-1].values())

    resumed, last = _stopped_then_resumed(SequenceEditor, tmp_path, model, stop_after=3)
    assert last["step"] == 3 and last["trainer"]["batches_drawn"] == 6
    assert resumed.editor.handed[0] == expected[6:8]  # it goes on with the batches after the ones drawn
    torch.testing.assert_close(resumed.editor.alphas, straight.editor.alphas, rtol=0, atol=0)
