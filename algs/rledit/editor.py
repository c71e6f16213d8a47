"""RLEdit: Reinforced Lifelong Editing for Language Models (Li et al., 2025; zhrli324/RLEdit).

MALMEN's network and least-squares update (algs/malmen/editor.py), trained over a *sequence* of edit batches applied
one after another to a drifting model, as the original's ``RLEDIT.train``. A training step takes ``rledit.seq_len``
batches B_1 .. B_T. At step t of the sequence the model already carries the updates of B_1 .. B_{t-1}, applied for
real and without a graph (W_{t-1}); the edit of B_t is computed on it (its keys and output gradients, the
normalisation's statistics updated), dW_t solved, and the loss of step t is

    L_t = sum_{j < back_depth} time_decay^j * ( cedit * NLL(rephrasings of B_{t-j} | W_{t-1} + dW_t)
                                              + cloc * KL(W_{t-1} || W_{t-1} + dW_t, unrelated inputs of B_{t-j}) )
          + reg_coef * |dW_t|^2

(each NLL and KL the sum over its chunks of ``rledit.chunk_size`` examples of the chunk's mean, as MALMEN's). Its
gradient reaches the network through dW_t only: the earlier updates are constants of step t (the original applies
them in place, ``weight.data += shift``), so the meta-gradient of step t does not flow through the updates of the
steps before it, but step t is trained to keep the edits of the batches before it. The penalty is computed from an
update without a graph, as in the original, so it changes no gradient (``rledit.reg_gradient=true``: it does).
After each step the network's gradient is added to the sequence's and the sum clipped to ``grad_clip`` (the
original's ``clip_grad_norm_`` inside ``update_hypernet``); the trainer steps the optimiser once per sequence.

The normalisation's statistics are updated by every edit, in training and when editing (the original's ``cache``):
they are the editor's lifelong state (``lifelong_state``), put back by the trainer after each validation sequence.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.profiler import record_function

from algs.malmen.editor import MALMEN, LocalityMetrics, _merge_metrics, surrogate_loss
from meta_loss import StepContext, StepLosses


def clip_total_norm(grads: Dict[int, torch.Tensor], max_norm: float) -> None:
    """Scale ``grads`` in place so that their joint norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``
    does (the coefficient max_norm / (norm + 1e-6), capped at 1)."""
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for key in grads:
        grads[key] = grads[key] * coef


class RLEdit(MALMEN):
    settings_group = "rledit"
    stats_while_editing = True

    def __init__(self, model: nn.Module, config, weights=None, net: Optional[nn.ModuleDict] = None):
        super().__init__(model, config, weights, net)
        # The trainer hands meta_loss this many batches at once: the sequence of one training step.
        self.batches_per_step = int(config.rledit.seq_len)

    # The statistics are updated by every edit: a sequence of edits changes the editor, and independent sequences
    # start from the same state by putting it back.
    def lifelong_state(self) -> Dict[str, torch.Tensor]:
        return self.statistics_state()

    def load_lifelong_state(self, state: Dict[str, torch.Tensor]) -> None:
        self.load_statistics_state(state)  # in place: every editor of with_weights shares them

    def _penalty_gradient(self, updates: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """d(reg_coef * |dW|^2)/dW = 2 reg_coef dW, in the layout of each edited weight."""
        scale = 2 * float(self.settings.reg_coef)
        return {n: scale * (u if self.layout[n][0] else u.T) for n, u in updates.items()}

    def _applied(self, current: MALMEN, leaves: Dict[str, torch.Tensor]) -> MALMEN:
        """The model the next batch of the sequence is edited on and judged by: ``current`` with the step's update
        applied for real, without a graph (the original's ``weight.data += shift``)."""
        return current.with_weights({n: w.detach() for n, w in leaves.items()})

    def meta_loss(self, batches, step: StepContext) -> StepLosses:
        """One training step over the sequence ``batches`` (see the module's docstring). In training, each step of
        the sequence back-propagates its loss to its edited weights and from there into the network at once (with
        the statistics as that step used them), and the clipped sum is kept for ``meta_backward``. The figures
        describe the last batch: its rephrasings and locality inputs after its edit (``edit``, ``loc``), and in
        validation before it (``pre_edit``, on the model the earlier batches edited)."""
        batches = batches if isinstance(batches, list) else [batches]
        cfg, settings = self.config, self.settings
        decay, depth = float(settings.time_decay), int(settings.back_depth)
        params: List[nn.Parameter] = self.outer_parameters()
        total: Dict[int, torch.Tensor] = {}
        trained, edit_time = torch.zeros(()), 0.0
        current: MALMEN = self  # the model with the sequence's updates so far, applied without a graph
        for t, batch in enumerate(batches):
            window = batches[max(0, t + 1 - depth) : t + 1][::-1]  # this batch first, then the ones before it
            last = t == len(batches) - 1
            start = time.perf_counter()
            with record_function("step/edit"):
                leaves, saved, inner_loss = current._detached_edit(batch["edit_inner"], step.training)
                edited = current.with_weights(leaves)
            edit_time += time.perf_counter() - start
            targets = [leaves[n] for n in self.inner_params]

            def backward(loss: torch.Tensor, targets: List[torch.Tensor] = targets) -> None:
                if step.training:
                    torch.autograd.backward(loss, inputs=targets)

            try:
                with torch.set_grad_enabled(step.training), step.checkpointing(self.model):
                    with record_function("step/post_edit_equivalence"):
                        for j, b in enumerate(window):
                            reference = current if last and j == 0 and not step.training else None
                            loss, post, pre = self._rephrasing_losses(
                                edited, b["edit_outer"], decay**j, backward, reference
                            )
                            trained = trained + loss
                            if j == 0:
                                post_parts, pre_parts = post, pre
                    with record_function("step/post_edit_locality"):
                        for j, b in enumerate(window):
                            loss, kl_sum, pre_loc, post_loc = self._locality_losses(
                                current, edited, b["loc"], decay**j, backward, step.lower
                            )
                            trained = trained + loss
                            if j == 0:
                                own = kl_sum, pre_loc, post_loc
            finally:
                if step.lower:
                    step.lower.clear()
            penalty = float(settings.reg_coef) * sum((u.float() ** 2).sum() for u in saved["updates"].values())
            trained = trained + penalty
            if step.training:
                extra = self._penalty_gradient(saved["updates"]) if settings.reg_gradient else None
                with record_function("step/backward_network"):
                    for key, g in self._network_gradients(saved, extra).items():
                        total[key] = total[key] + g if key in total else g
                    clip_total_norm(total, float(cfg.grad_clip))
            current = self._applied(current, leaves)
        kl_sum, pre_loc, post_loc = own
        loc = batches[-1]["loc"]
        mask = loc.get("decoder_attention_mask", loc["attention_mask"])
        post_edit = _merge_metrics(post_parts)
        l_edit, l_loc = post_edit["nll"], kl_sum / mask.sum().clamp(min=1)
        total_edit = cfg.cedit * l_edit + cfg.cloc * l_loc
        n_positions = float(len(saved["keys"][self.inner_params[0]]))
        return StepLosses(
            loss=trained,
            total=total_edit + penalty,
            total_edit=total_edit,
            edit=l_edit,
            loc=l_loc,
            post_edit=post_edit,
            pre_loc_logits=LocalityMetrics(_merge_metrics(pre_loc) if pre_loc else {}),
            post_loc_logits=LocalityMetrics(_merge_metrics(post_loc) if post_loc else {}),
            pre_edit=None if step.training else _merge_metrics(pre_parts),
            info={
                "loss/edit_inner": inner_loss,
                "loss/sequence": trained.item(),
                "rledit/reg": float(penalty),
                "rledit/positions": n_positions,
            },
            edit_time=edit_time / len(batches),
            saved={"network_grads": total, "params": params},
        )

    def meta_backward(self, losses: StepLosses, backward) -> None:
        """The sequence's network gradient, summed and clipped step by step in ``meta_loss``, handed to the trainer
        as one surrogate loss (its optimiser then steps once per sequence, as the original's)."""
        saved = losses.saved
        backward(surrogate_loss(saved["params"], saved["network_grads"], losses.loss))
