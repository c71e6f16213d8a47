"""The contract every editor (MEND, and the baselines) implements.

An ``EditableModel`` wraps a frozen base model and an editor. ``edit(batch, condition)``
returns a *new* ``EditableModel`` that shares the base model and the editor's parameters and
carries the edited weights as a dict of tensors, run through ``torch.func.functional_call``.
The base model's parameters are never written to.

A subclass implements exactly:
  - ``edit(batch, condition=None, diagnostics=False) -> (EditableModel, info: dict[str, float])``; with
    ``diagnostics`` it may also compute figures that are only logged (MEND's cosine to the true gradient);
  - ``with_weights(weights) -> EditableModel``: the same editor on other edited weights (what ``edit`` returns);
  - ``outer_parameters() -> list[nn.Parameter]``: everything the outer (editor-training) optimiser updates.
It may also override:
  - ``outer_lr()``, the learning rate of the outer parameters, read from the editor's config group (e.g.
    ``mend.lr``); an editor with outer parameters must name it;
  - ``step_size_parameters()`` when some outer parameters (learned step sizes) take their own optimiser, with
    ``step_size_lr()`` its learning rate (e.g. ``mend.lr_lr``; None: they train with the other outer parameters at
    ``outer_lr()``, as the original code's ENN does);
  - ``base_loss(loc_inputs, mask)``, an extra training loss on the locality inputs (ENN's ``train_base``);
  - ``attach_training_data(dataset)``, for editors that draw data at edit time (FT+KL);
  - ``attach_text(tokenizer, second_moments)``, for editors that build prompts from the requests' text and need
    key statistics (ROME, MEMIT, AlphaEdit);
  - the training step (``meta_loss.py``): ``meta_loss(batch, step) -> StepLosses``, the loss of one training or
    validation step (default: the edit, then cedit * L_edit + cloc * L_loc on the edited model, plus
    ``base_loss``); ``meta_backward(losses, backward)``, how that loss becomes gradients (default:
    ``backward(losses.loss)``; an editor that back-propagates in stages runs the first ones itself and hands
    ``backward`` the surrogate loss of the last, once per step); ``batches_per_step`` (class attribute, default
    1): a step that spans several batches, handed to ``meta_loss`` as a list (an editor trained over a sequence
    of edits applied one after another).
It declares what generic code must know about it, so that no generic module names an editor:
  - ``needs_training`` (class attribute; False: nothing to train, the trainer evaluates it directly) and
    ``can_train_base`` (``train_base=True`` is allowed), checked by ``check_config(cfg)`` before anything loads;
  - ``running_statistics()``, data statistics (count / mean / m2 buffers) that are carried over to an untrained
    editor (``copy_statistics_from``) and merged over the processes of a distributed run;
  - ``activation_bytes(n_tokens)``, its share of the memory estimate;
  - ``low_rank_update(name)``, the update of an edit as low-rank factors, for compact patches (``python -m edit``);
  - ``trained_base()``, the base model's parameters as the editor trained them (ENN's ``train_base``), which
    ``python -m edit`` edits instead of the original ones.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from errors import ConfigError
from losses import IGNORE, binary_log_probs, masked_log_probs
from meta_loss import StepContext, StepLosses, edit_meta_loss

STATISTICS_BUFFERS = ("count", "mean", "m2")  # the buffers of every running_statistics() module


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a transformers model output (or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def output_with_weights(model: nn.Module, weights: Dict[str, torch.Tensor], kwargs: dict):
    """``model(**kwargs)`` with ``weights`` in place of the same-named parameters (none: as it is). The model itself
    is not changed: the weights are bound for this call only (``torch.func.functional_call``)."""
    if weights:
        return functional_call(model, weights, (), kwargs, strict=False)
    return model(**kwargs)


def call_with_weights(model: nn.Module, weights: Dict[str, torch.Tensor], kwargs: dict) -> torch.Tensor:
    """The logits of :func:`output_with_weights`."""
    return logits_of(output_with_weights(model, weights, kwargs))


def forward_takes(model: nn.Module, argument: str) -> bool:
    """The model's forward has a parameter named ``argument`` (looked up once per class)."""
    key = (type(model), argument)
    if key not in _FORWARD_TAKES:
        _FORWARD_TAKES[key] = argument in inspect.signature(type(model).forward).parameters
    return _FORWARD_TAKES[key]


_FORWARD_TAKES: Dict[tuple, bool] = {}


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """The model's forward can compute its logits at chosen positions only (transformers' ``logits_to_keep``)."""
    return forward_takes(model, "logits_to_keep")


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache in the model's forward and output: ``cache`` where the forward takes it (newer
    transformers 5 releases, which warn on the old name), else ``past_key_values``."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def state_dict_with(model: nn.Module, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``model``'s state dict with ``weights`` substituted (detached)."""
    state = dict(model.state_dict())
    state.update({n: w.detach() for n, w in weights.items()})
    return state


class EditableModel(nn.Module, ABC):
    #: False for an editor with nothing to train (no outer parameters, e.g. fine-tuning): the trainer evaluates it
    #: directly, and ``eval_only=True`` needs no ``archive``.
    needs_training: bool = True
    #: True for an editor that can also train the base model (``train_base=True``) through :meth:`base_loss`.
    can_train_base: bool = False
    #: The batches one training step draws: above 1, :meth:`meta_loss` gets a list of them (a meta-step over a
    #: sequence of edits applied one after another).
    batches_per_step: int = 1
    #: True: the editor edits causal language models only (check_config refuses another model.kind)
    causal_lm_only: bool = False

    @classmethod
    def check_config(cls, cfg) -> None:
        """Checks of the run configuration that depend on what this editor can do, made before anything loads."""
        if cfg.eval_only and cfg.archive is None and cls.needs_training:
            raise ConfigError(
                f"eval_only=True needs archive=<checkpoint file or run directory> holding a trained {cfg.alg} editor."
            )
        if cfg.train_base and not cls.can_train_base:
            raise ConfigError(
                f"train_base=True: alg={cfg.alg} cannot train the base model (it has no base loss); set "
                f"train_base=False, or use an editor that trains the base (see the baselines in docs/results.md)."
            )
        if cls.causal_lm_only and cfg.model.kind != "causal_lm":
            raise ConfigError(
                f"alg={cfg.alg} edits causal language models only (model.kind={cfg.model.kind}); choose a causal LM "
                f"(+model=smollm2, +model=gpt2, ...)."
            )

    def __init__(self, model: nn.Module, config, weights: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        # Kept out of the module tree: the base model is not part of the editor's parameters,
        # state dict or device moves, and it is never trained here.
        object.__setattr__(self, "model", model)
        self.config = config
        self.weights: Dict[str, torch.Tensor] = dict(weights or {})
        self.is_classifier = config.model.kind == "classifier"
        self.shift = config.model.kind == "causal_lm"

    # -- running the (edited) model -------------------------------------------------------
    def forward(self, *args, **kwargs) -> torch.Tensor:
        if self.weights:
            return logits_of(functional_call(self.model, self.weights, args, kwargs, strict=False))
        return logits_of(self.model(*args, **kwargs))

    def logits_with(self, inputs: dict, weights: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of this model on ``inputs`` with ``weights`` in place of the same-named weights."""
        inputs = {k: v for k, v in inputs.items() if k != "labels" and isinstance(v, torch.Tensor)}
        return call_with_weights(self.model, {**self.weights, **weights}, inputs)

    def loss_with(self, batch: dict, weights: Dict[str, torch.Tensor]) -> dict:
        """Edit-loss metrics of ``batch`` (with labels) with ``weights`` in place of the same-named weights.

        A causal LM whose forward takes ``logits_to_keep`` computes its vocabulary head only at the positions that
        predict a label (``speed.label_logits_only``): the same metrics, without the logits nobody reads."""
        labels = batch["labels"]
        kept = self._label_positions(labels)
        if kept is None:
            return self.edit_loss_fn(self.logits_with(batch, weights), labels)
        logits = self.logits_with({**batch, "logits_to_keep": kept}, weights)
        return masked_log_probs(logits, labels[:, kept + 1], shift=False)

    def _label_positions(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """The positions whose logits predict a label (those before a label), or None: compute every position."""
        if not (self.shift and self.config.speed.label_logits_only and accepts_logits_to_keep(self.model)):
            return None
        kept = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)
        return kept if kept.numel() else None

    def current_weight(self, name: str) -> torch.Tensor:
        """The weight ``name`` as this (possibly edited) model uses it."""
        if name in self.weights:
            return self.weights[name]
        return self.model.get_parameter(name)

    @property
    def inner_params(self) -> List[str]:
        return list(self.config.model.inner_params)

    # -- losses ------------------------------------------------------------------------
    def edit_loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        if self.is_classifier:
            return binary_log_probs(logits, labels)
        return masked_log_probs(logits, labels, shift=self.shift)

    loc_loss_fn = edit_loss_fn

    # -- the contract ---------------------------------------------------------------------
    @abstractmethod
    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        """Apply the edit described by ``batch``; return (edited EditableModel, info dict). ``diagnostics``: also put
        the figures that are only logged in ``info`` (the trainer asks on the steps that log; off when applying)."""

    # -- the training step ----------------------------------------------------------------
    def meta_loss(self, batch, step: StepContext) -> StepLosses:
        """The losses of one training (or validation) step on ``batch`` (a list of ``batches_per_step`` batches
        when that is above 1). Default: :func:`meta_loss.edit_meta_loss`."""
        return edit_meta_loss(self, batch, step)

    def meta_backward(self, losses: StepLosses, backward: Callable[[torch.Tensor], None]) -> None:
        """Turn the step's losses into gradients of :meth:`outer_parameters` through ``backward(tensor)``, the
        trainer's backward (gradient accumulation, DDP, skipping a non-finite step). Default: ``backward(losses.loss)``.
        An editor that back-propagates in stages (MALMEN: first to the edited weights, then from there into the
        editor's parameters) runs the first ones itself and calls ``backward`` once, on the last one's surrogate loss
        (e.g. ``(update * grad_of_the_edited_weights.detach()).sum()``)."""
        backward(losses.loss)

    @abstractmethod
    def with_weights(self, weights: Dict[str, torch.Tensor]) -> EditableModel:
        """This editor (sharing its parameters, statistics and state) on the model edited to ``weights``, in the
        same train / eval mode: what :meth:`edit` returns, and what a further edit starts from."""

    def low_rank_update(self, name: str):
        """On an editor returned by :meth:`edit`: the update it applied to weight ``name`` as low-rank factors
        ``(u, v, alpha, fan_in_fan_out)`` with ``W_edited = W - alpha * (v^T u)`` (``u^T v`` when
        ``fan_in_fan_out``), or None when it has no such form; a patch then stores the dense difference."""
        return None

    @abstractmethod
    def outer_parameters(self) -> List[nn.Parameter]:
        """All parameters trained by the outer loop."""

    def step_size_parameters(self) -> List[nn.Parameter]:
        """Outer parameters that take the separate step-size optimiser (``step_size_lr()``). Default: none."""
        return []

    def outer_lr(self) -> float:
        """Learning rate of the outer parameters that are not step sizes (a key of the editor's config group)."""
        raise NotImplementedError(f"{type(self).__name__} has outer parameters but names no learning rate for them")

    def step_size_lr(self) -> Optional[float]:
        """Learning rate of the step-size optimiser (``step_size_parameters()``); None: no such optimiser, the step
        sizes train in the main one at ``outer_lr()``."""
        raise NotImplementedError(f"{type(self).__name__} has step sizes but names no learning rate for them")

    def base_loss(self, loc_inputs: dict, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An extra training loss on the locality inputs; None: no such term.

        It enters the gradient unweighted, as the original's ``safe_backward(l_base, ...)``; ``cbase`` weighs it in
        the logged ``loss/total`` only."""
        return None

    def attach_training_data(self, dataset) -> None:
        """Give the editor the training set, for editors that draw batches at edit time. Default: unused."""

    def attach_text(self, tokenizer, second_moments) -> None:
        """Give the editor the tokenizer and ``second_moments(module_name, n_samples)``, the second moment of a
        layer's inputs over the embedded corpus (``key_stats.SecondMoments``), for editors that build their own
        prompts from the requests' text and weigh keys by those statistics (ROME, MEMIT, AlphaEdit; ``editing.Editor``
        calls it). Default: unused."""

    def trained_base(self) -> Dict[str, torch.Tensor]:
        """The base model's parameters as this editor trained them (ENN's ``train_base``), by parameter name: the
        model that edits apply to. Default: none (the base model is used as it is)."""
        return {}

    def running_statistics(self) -> Dict[str, nn.Module]:
        """Submodules holding data statistics (not learned parameters) as ``count``, ``mean`` and ``m2`` buffers,
        updated in training mode (MEND's input normalisation). They are carried over to the untrained editor of
        the final comparison and merged over the processes of a distributed run. Default: none."""
        return {}

    @torch.no_grad()
    def copy_statistics_from(self, other: EditableModel) -> None:
        """Take ``other``'s data statistics (:meth:`running_statistics`); learned parameters stay as they are."""
        theirs = other.running_statistics()
        for name, module in self.running_statistics().items():
            for key in STATISTICS_BUFFERS:
                getattr(module, key).copy_(getattr(theirs[name], key))

    def statistics_state(self) -> Dict[str, torch.Tensor]:
        """Copies of the :meth:`running_statistics` buffers, keyed ``<module>.<count|mean|m2>``."""
        return {
            f"{name}.{key}": getattr(module, key).detach().clone()
            for name, module in self.running_statistics().items()
            for key in STATISTICS_BUFFERS
        }

    @torch.no_grad()
    def load_statistics_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Put back a :meth:`statistics_state`, in place (every editor sharing the modules sees it)."""
        for name, module in self.running_statistics().items():
            for key in STATISTICS_BUFFERS:
                getattr(module, key).copy_(state[f"{name}.{key}"])

    def lifelong_state(self) -> Dict[str, torch.Tensor]:
        """What the editor carries from one edit to the next besides the edited weights (UltraEdit's running
        statistics), as copies; :meth:`load_lifelong_state` puts it back, so that a caller can start independent
        sequences from the same state. Default: nothing (each edit depends on the weights alone)."""
        return {}

    def load_lifelong_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore a state from :meth:`lifelong_state`. Default: nothing to restore."""

    def activation_bytes(self, n_tokens: int) -> int:
        """Estimated bytes the editor's own computation keeps for the backward pass of an edit on ``n_tokens`` token
        positions (``memory.estimate``). Default: per edited weight, its fp32 input and output-gradient sides and
        one transformed copy of them."""
        return sum(n_tokens * 4 * 3 * sum(self.model.get_parameter(n).shape) for n in self.inner_params)

    def edited_state_dict(self) -> Dict[str, torch.Tensor]:
        """The base model's state dict with the edited weights substituted (detached copies)."""
        return state_dict_with(self.model, {n: w.clone() for n, w in self.weights.items()})
