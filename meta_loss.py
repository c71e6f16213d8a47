"""The training step's loss as an editor computes it: what the trainer asks for, and what it gets back.

The trainer hands an editor a batch and a :class:`StepContext` (training or evaluating, whether to compute the
figures that are only logged, the trainer's reuse of the lower blocks and activation checkpointing) and gets a
:class:`StepLosses` back; it then backpropagates ``loss`` (through ``EditableModel.meta_backward``), steps the
optimisers, validates and checkpoints around it. :func:`edit_meta_loss` is ``EditableModel.meta_loss``'s default,
the step of every editor that edits once per batch:

    L = cedit * L_edit + cloc * L_loc  (+ the editor's base_loss, unweighted)

with L_edit the edited model's NLL on the rephrased edits (``edit_outer``) and L_loc the KL from the unedited to
the edited model on the locality inputs (``loc``). The parts are labelled for the profiler (``step/pre_edit``,
``step/edit``, ``step/post_edit_equivalence``, ``step/post_edit_locality``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
from torch.profiler import record_function

from losses import kl_loc_loss
from utils import model_inputs


def _no_checkpointing(model) -> ContextManager:
    return contextlib.nullcontext()


@dataclass
class StepContext:
    """What the trainer tells an editor about one step.

    ``training``: the loss will be backpropagated (False: validation). ``diagnostics``: also compute the figures that
    are only logged (e.g. a cosine to the true gradient; the trainer asks on the steps that log). ``lower``: the
    blocks below the edits (``blocks.LowerBlocks``), recorded in the unedited locality pass and replayed in the
    edited one; None: run them twice. ``checkpointing(model)``: a context in which the edited model's passes
    recompute their activations in the backward pass (``memory.activation_checkpointing``)."""

    training: bool
    diagnostics: bool = False
    lower: Optional[Any] = None
    checkpointing: Callable[[torch.nn.Module], ContextManager] = _no_checkpointing


@dataclass
class StepLosses:
    """One step's losses and what its metrics need.

    ``loss`` is what the trainer backpropagates; ``total`` the logged total (``cbase`` weighs ``base`` there);
    ``total_edit`` = cedit * ``edit`` + cloc * ``loc``. ``post_edit``: the edited model's metrics on the rephrased
    edits (``losses.masked_log_probs``' dict); ``pre_edit``: the unedited model's (validation only). The logits on
    the locality inputs before and after the edit give the drawdown. ``info``: the editor's own figures;
    ``edit_time``: seconds the edit took; ``saved``: what the editor's ``meta_backward`` needs beyond the loss (e.g. the
    edit's cached factors). An editor whose step spans several batches describes its last one."""

    loss: torch.Tensor
    total: torch.Tensor
    total_edit: torch.Tensor
    edit: torch.Tensor
    loc: torch.Tensor
    post_edit: Dict[str, torch.Tensor]
    pre_loc_logits: torch.Tensor
    post_loc_logits: torch.Tensor
    base: Optional[torch.Tensor] = None
    pre_edit: Optional[Dict[str, torch.Tensor]] = None
    info: Dict[str, float] = field(default_factory=dict)
    edit_time: float = 0.0
    saved: Dict[str, Any] = field(default_factory=dict)  # what an editor keeps for its meta_backward


def edit_meta_loss(editor, batch: dict, step: StepContext, edit: Optional[Callable] = None) -> StepLosses:
    """One edit of ``editor`` on ``batch`` (``edit_inner``, ``edit_outer``, ``loc``, ``cond``) and its losses.

    ``edit(batch, condition, diagnostics=...) -> (edited, info)`` makes the edit (default: ``editor.edit``): an
    editor that trains differently (its edit applied detached, then back-propagated in stages) passes its own."""
    edit = editor.edit if edit is None else edit
    cfg = editor.config
    loc, outer = batch["loc"], batch["edit_outer"]
    loc_mask = loc.get("decoder_attention_mask", loc["attention_mask"])
    lower = step.lower

    # 1. the unedited model: its logits on the locality inputs (the lower blocks' outputs recorded)
    with torch.no_grad(), record_function("step/pre_edit"):
        with lower.record() if lower else contextlib.nullcontext():
            pre_loc_logits = editor(**model_inputs(loc))
        pre_edit = None if step.training else editor.loss_with(outer, {})

    try:
        # 2. the edit
        start = time.perf_counter()
        with record_function("step/edit"):
            edited, info = edit(batch["edit_inner"], batch.get("cond"), diagnostics=step.diagnostics)
        edit_time = time.perf_counter() - start

        # 3. the edited model on the rephrased edits and on the locality inputs (the lower blocks replayed)
        with torch.set_grad_enabled(step.training), step.checkpointing(edited.model):
            with record_function("step/post_edit_equivalence"):
                post_edit = edited.loss_with(outer, {})
            with record_function("step/post_edit_locality"):
                with lower.replay(edited.weights) if lower else contextlib.nullcontext():
                    post_loc_logits = edited(**model_inputs(loc))
            l_edit = post_edit["nll"]
            l_loc = kl_loc_loss(pre_loc_logits, post_loc_logits, loc_mask)
            l_total_edit = cfg.cedit * l_edit + cfg.cloc * l_loc
            l_train, l_total = l_total_edit, l_total_edit
            # An editor that also trains the base model (train_base) adds its own term on the locality inputs:
            # unweighted in the gradient, cbase-weighted in the logged total, as in the original.
            l_base = editor.base_loss(model_inputs(loc), loc_mask) if step.training else None
            if l_base is not None:
                l_train = l_total_edit + l_base
                l_total = l_total_edit + cfg.cbase * l_base
    finally:
        if lower:
            lower.clear()
    return StepLosses(
        loss=l_train,
        total=l_total,
        total_edit=l_total_edit,
        edit=l_edit,
        loc=l_loc,
        post_edit=post_edit,
        pre_loc_logits=pre_loc_logits,
        post_loc_logits=post_loc_logits,
        base=l_base,
        pre_edit=pre_edit,
        info=info,
        edit_time=edit_time,
    )
