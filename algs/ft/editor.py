"""Fine-tuning (FT) and fine-tuning with a KL penalty (FT+KL) as editors.

An edit fine-tunes a residual R added to each edited weight (W~ = W + R, R = 0 at the start; with
``ft.rank`` set, R = U V with U random and V zero) on the edit example with ``ft.opt`` (RMSprop) at
``ft.lr``, until the edit target is the greedy prediction for every edit of the batch, or
``ft.max_edit_steps`` optimizer steps, or ``ft.time_limit`` seconds. The base model is not touched.

``ft.locality.enabled=True`` gives FT+KL: each step draws ``ft.locality.batch_size`` locality examples
from the training set and minimises KL(unedited || edited) on them + ``ft.locality.cedit`` * edit loss.

There is nothing to train: ``outer_parameters()`` is empty, and the trainer evaluates FT directly.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from editable_model import EditableModel
from errors import ConfigError
from losses import kl_loc_loss
from utils import model_inputs, to_device

LOG = logging.getLogger(__name__)


class FT(EditableModel):
    needs_training = False  # nothing learned: each edit runs its own optimiser on the edited weights

    def __init__(self, model: nn.Module, config, weights=None):
        super().__init__(model, config, weights)
        if not hasattr(torch.optim, config.ft.opt):
            raise ConfigError(f"ft.opt={config.ft.opt!r} is not a torch.optim optimizer (e.g. RMSprop, Adam, SGD).")
        self._train_set = None
        self._loc_batches: Optional[Iterator[dict]] = None
        # Set by edit() on the editor it returns: the optimizer steps the edit took.
        self.steps_taken = 0

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> FT:
        edited = FT(self.model, self.config, weights=weights)
        edited._train_set, edited._loc_batches = self._train_set, self._loc_batches
        edited.train(self.training)
        return edited

    def outer_parameters(self) -> List[nn.Parameter]:
        return []

    def attach_training_data(self, dataset) -> None:
        self._train_set = dataset
        self._loc_batches = None

    def _locality_batch(self, device) -> dict:
        if self._train_set is None:
            raise RuntimeError(
                "ft.locality.enabled=True draws locality examples from the training set at edit time: call "
                "attach_training_data(train_set) on the editor first (run.build does)."
            )
        if self._loc_batches is None:
            n_edits = int(self.config.data.n_edits)
            self._loc_batches = self._train_set.edit_generator(n_edits + int(self.config.ft.locality.batch_size))
        return to_device(next(self._loc_batches)["loc"], device)

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        cfg = self.config.ft
        names = self.inner_params
        base = {n: self.current_weight(n).detach() for n in names}
        factors: Dict[str, List[nn.Parameter]] = {}
        for n, w in base.items():
            if cfg.rank is not None:
                u = torch.randn(w.shape[0], cfg.rank, device=w.device, dtype=w.dtype) * cfg.init_std
                factors[n] = [
                    nn.Parameter(u),
                    nn.Parameter(torch.zeros(cfg.rank, w.shape[1], device=w.device, dtype=w.dtype)),
                ]
            else:
                factors[n] = [nn.Parameter(torch.zeros_like(w))]
        params = [p for fs in factors.values() for p in fs]
        opt = getattr(torch.optim, cfg.opt)(params, lr=cfg.lr)

        def edited_weights():
            return {n: base[n] + (fs[0] @ fs[1] if len(fs) == 2 else fs[0]) for n, fs in factors.items()}

        start = time.perf_counter()
        steps, first_loss, acc = 0, None, 0.0
        with torch.enable_grad():
            while True:
                weights = edited_weights()
                metrics = self.loss_with(batch, weights)
                l_edit, acc = metrics["nll"], metrics["acc"].item()
                if first_loss is None:
                    first_loss = l_edit.item()
                if acc == 1.0 or steps >= cfg.max_edit_steps:
                    break
                if cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit:
                    break
                loss = l_edit
                if cfg.locality.enabled:
                    loc = self._locality_batch(l_edit.device)
                    inputs = model_inputs(loc)
                    with torch.no_grad():
                        pre = self(**inputs)
                    post = self.logits_with(inputs, weights)
                    mask = loc.get("decoder_attention_mask", loc["attention_mask"])
                    loss = kl_loc_loss(pre, post, mask) + cfg.locality.cedit * l_edit
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if cfg.verbose:
                    LOG.info("ft step %d: edit loss %.4f, acc %.2f", steps, l_edit.item(), acc)

        new_weights = {**self.weights, **{n: w.detach() for n, w in edited_weights().items()}}
        edited = self.with_weights(new_weights)
        edited.steps_taken = steps
        info = {"loss/edit_inner": first_loss, "ft/steps": float(steps), "ft/success_inner": acc}
        return edited, info
