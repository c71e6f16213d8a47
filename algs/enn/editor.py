"""Editable Neural Networks (ENN; Sinitsin et al., "Editable Neural Networks", ICLR 2020).

An edit is ``enn.n_edit_steps`` plain gradient steps on the edit loss over the edited weights, each weight
with its own learned step size alpha_l:

    W_{k+1} = W_k - alpha_l * grad_W L_e(W_k).

The step sizes start at ``enn.edit_lr`` and train with their own optimiser at ``enn.lr_lr``
(``enn.step_sizes=separate``, the default); ``enn.step_sizes=original`` trains them as the original code does, in
the main optimiser at ``enn.lr`` (its step-size optimiser at ``lr_lr`` never moves them: the main optimiser's
``zero_grad`` runs before it steps, so they train 100 times slower than at ``lr_lr``). Training the editor
differentiates through these steps (the inner gradients are part of the graph, so the outer gradient has
second-order terms; ``enn.first_order=True`` treats the inner gradients as constants). With ``train_base=True``
every parameter of the base model is trained as well (at ``enn.lr``), as the original's ENN does (its
``outer_parameters()`` is all of them), so that the model becomes easier to edit: the editor holds a trainable
copy of the model's parameters and adds KL(original || current) on the locality inputs, where the original is the
untouched base model (no second copy of the model object is made).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from algs.enn import check as check_settings
from editable_model import EditableModel, logits_of
from losses import kl_loc_loss


def _key(name: str) -> str:
    return name.replace(".", "#")


class ENN(EditableModel):
    can_train_base = True  # train_base=True: the base model is trained too, through base_loss

    def __init__(
        self,
        model: nn.Module,
        config,
        weights=None,
        edit_lrs: Optional[nn.Parameter] = None,
        base_weights: Optional[nn.ParameterDict] = None,
    ):
        super().__init__(model, config, weights)
        check_settings(config)  # a configuration built in code has not been through validate_config
        if edit_lrs is None:
            edit_lrs = nn.Parameter(torch.full((len(self.inner_params),), float(config.enn.edit_lr)))
        self.edit_lrs = edit_lrs
        if config.train_base and base_weights is None:
            # Every parameter (tied ones once: named_parameters() lists each tensor once, and functional_call ties
            # the substituted copies again).
            base_weights = nn.ParameterDict(
                {_key(n): nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
            )
        self.base_weights = base_weights
        if base_weights is not None and not self.weights:
            # The unedited model runs with the trained base parameters in place of the original ones.
            self.weights = {n.replace("#", "."): p for n, p in base_weights.items()}

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> ENN:
        edited = ENN(self.model, self.config, weights=weights, edit_lrs=self.edit_lrs, base_weights=self.base_weights)
        edited.train(self.training)
        return edited

    def trained_base(self) -> Dict[str, torch.Tensor]:
        if self.base_weights is None:
            return {}
        return {n.replace("#", "."): p.detach() for n, p in self.base_weights.items()}

    def outer_parameters(self) -> List[nn.Parameter]:
        base = list(self.base_weights.parameters()) if self.base_weights is not None else []
        return base + [self.edit_lrs]

    def step_size_parameters(self) -> List[nn.Parameter]:
        return [self.edit_lrs]

    def outer_lr(self) -> float:
        return float(self.config.enn.lr)

    def step_size_lr(self) -> Optional[float]:
        if self.config.enn.step_sizes == "original":
            return None  # in the main optimiser at enn.lr, as the original code trains them
        return float(self.config.enn.lr_lr)

    def base_loss(self, loc_inputs: dict, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.base_weights is None:
            return None
        with torch.no_grad():
            original = logits_of(self.model(**loc_inputs))
        return kl_loc_loss(original, self(**loc_inputs), mask)

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        names = self.inner_params
        # Differentiate through the inner steps only when the outer loop trains (and second order is asked for).
        create_graph = self.training and torch.is_grad_enabled() and not self.config.enn.first_order
        weights = {n: self.current_weight(n) for n in names}
        info = {}

        # Fused attention kernels have no double backward: the inner forward uses the composite (math) kernel
        # whenever its gradient is differentiated again.
        def kernel():
            return sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()

        with torch.enable_grad():
            for step in range(self.config.enn.n_edit_steps):
                weights = {n: w if w.requires_grad else w.detach().requires_grad_(True) for n, w in weights.items()}
                with kernel():
                    loss = self.loss_with(batch, weights)["nll"]
                grads = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=create_graph)
                weights = {n: weights[n] - self.edit_lrs[i] * grads[i] for i, n in enumerate(names)}
                if step == 0:
                    info["loss/edit_inner"] = loss.item()
        if not self.training:
            weights = {n: w.detach() for n, w in weights.items()}
        return self.with_weights({**self.weights, **weights}), info
