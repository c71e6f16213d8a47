"""UltraEdit: training-free, subject-free, memory-free lifelong editing (Gu et al., 2025; arXiv 2505.14679).

For an edited linear layer y = W x, one edit collects at every target position i (the positions that predict a
target token) the layer's input k_i = x_i and the gradient of the edit loss at its output g_i = dL/dy_i, the factors
of the loss gradient grad_W = sum_i g_i k_i^T. The concatenation z_i = [k_i; g_i] updates a running mean and spread
kept per weight shape for the whole life of the editor (lifelong normalisation), and is standardised with them:
z^_i = (z_i - mean) / (std + eps) = [k^_i; g^_i]. The output each key should move by is
v_i = -lr * |k^_i|^2 * g^_i, and the update is the ridge least-squares solution for the raw keys K (N x d_in) and
those targets V (N x d_out):

    dW = argmin |K dW - V|^2 + lambda |dW|^2 = (K^T K + lambda I)^-1 K^T V      (d_in x d_out; y~ = y + dW^T x)

Nothing is trained. What persists from one edit to the next is the statistics (buffers of this module, in its state
dict, shared by every editor ``with_weights`` returns) and the edited weights. The few differences from the authors'
code (XiaojieGu/UltraEdit) are listed in docs/ultraedit.md; tests/test_ultraedit.py holds this editor to the numbers
their code computes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from editable_model import EditableModel
from losses import IGNORE
from models import edited_module_name as module_name
from models.inner_params import capture_calls, weight_layout


class LifelongNorm(nn.Module):
    """The running mean and spread of the rows z = [k; g] of every edit so far, one per weight shape.

    The update is the authors' (``nets.RunningMeanStd``), operation for operation: ``var_sum`` accumulates
    ``B * var(batch) + count * B * delta^2 / (count + B)`` with the batch's unbiased variance, and
    ``std = sqrt(var_sum / (count - 1 + eps))``. A batch of one row adds no variance (the authors' code would make
    the statistics NaN: the unbiased variance of one row is undefined).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var_sum", torch.zeros(dim))
        self.register_buffer("std", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        if b == 0:
            return
        eps = torch.finfo(x.dtype).eps
        total = self.count + b
        delta = x.mean(0) - self.mean
        batch_var = x.var(0) if b > 1 else torch.zeros_like(self.mean)
        self.mean += b * delta / total
        self.var_sum += b * batch_var + self.count * b * delta.pow(2) / total
        self.std = (self.var_sum / (total - 1 + eps)).sqrt()
        self.count = total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


def ridge_update(
    keys: torch.Tensor, values: torch.Tensor, ridge: float
) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """dW = (K^T K + ridge I)^-1 K^T V (d_in x d_out), and its low-rank factors (K, A) with dW = K^T A when it has
    fewer rows N than inputs d_in.

    With N >= d_in the d_in x d_in system is solved, as the authors' code does. With N < d_in the same solution is
    computed as K^T (K K^T + ridge I)^-1 V, an N x N system (the push-through identity): cheaper, and its factors
    make a compact patch."""
    n, d_in = keys.shape
    if n < d_in:
        gram = keys @ keys.T + ridge * torch.eye(n, device=keys.device, dtype=keys.dtype)
        coeffs = torch.linalg.solve(gram, values)  # (N, d_out)
        return keys.T @ coeffs, (keys, coeffs)
    mat = keys.T @ keys + ridge * torch.eye(d_in, device=keys.device, dtype=keys.dtype)
    return torch.linalg.solve(mat, keys.T @ values), None


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) mask of the positions whose output predicts a target token (labels are aligned with the inputs)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def longest_first_chunks(attention_mask: torch.Tensor, size: int) -> List[torch.Tensor]:
    """The row indices of a batch in chunks of ``size``, the rows ordered by length, longest first (ties in their
    order): how the authors' data loader (MALMEN's and UltraEdit's ``BaseDataset.collate_fn``) groups edits."""
    lengths = attention_mask.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [
        torch.tensor(order[start : start + size], device=attention_mask.device) for start in range(0, len(order), size)
    ]


def chunked_factors(
    editor: EditableModel,
    batch: dict,
    chunk_size: int,
    on_rows: Optional[Callable] = None,
    full_chunk_scale: bool = False,
) -> Tuple[Dict[str, List[torch.Tensor]], Dict[str, List[torch.Tensor]], float]:
    """The keys k_i (the layer's inputs) and output gradients g_i = dL/dy_i of every edited weight of ``editor`` at
    the target positions of ``batch``, one forward/backward pass per chunk of ``chunk_size`` edits (longest first),
    L the chunk's mean target cross-entropy at the editor's current weights; and the mean of the chunks' losses.

    Returns name -> a list of (rows, d_in) keys and of (rows, d_out) gradients, one entry per chunk, in float32.
    ``on_rows(name, keys, grads)`` is called after each chunk for each weight in the order of ``inner_params``
    (a running normalisation's update).

    ``full_chunk_scale``: the gradients of a chunk of fewer than ``chunk_size`` edits are multiplied by its share of a
    full chunk (a mean over fewer target tokens has larger gradients per token: a single edit's would be
    ``chunk_size`` times those of an edit in a full chunk). Full chunks are unchanged."""
    name_of = type(editor).__name__
    names = editor.inner_params
    modules = [module_name(n) for n in names]
    labels = batch["labels"]
    positions = target_positions(labels)
    if not positions.any():
        raise ValueError(f"{name_of}: the batch has no target tokens to edit towards.")
    keys: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    grads: Dict[str, List[torch.Tensor]] = {n: [] for n in names}
    losses = []
    for rows in longest_first_chunks(batch["attention_mask"], chunk_size):
        chunk = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
        mask = positions[rows]
        if not mask.any():
            continue
        with torch.enable_grad():
            leaves = {n: editor.current_weight(n).detach().requires_grad_(True) for n in names}
            with capture_calls(editor.model, modules) as calls:
                loss = editor.loss_with(chunk, leaves)["nll"]
            for n, m in zip(names, modules):
                if len(calls[m]["out"]) != 1:
                    n_calls = len(calls[m]["out"])
                    raise RuntimeError(f"{name_of}: {n} is used {n_calls} times per forward pass, not once.")
            outputs = [calls[m]["out"][0] for m in modules]
            out_grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        losses.append(loss.item())
        share = len(rows) / chunk_size
        if full_chunk_scale and share < 1:
            out_grads = [None if g is None else g * share for g in out_grads]
        for n, m, out, g in zip(names, modules, outputs, out_grads):
            g = torch.zeros_like(out) if g is None else g
            k_rows = calls[m]["x"][0][mask].float()
            g_rows = g.detach()[mask].float()
            if on_rows is not None:
                on_rows(n, k_rows, g_rows)
            keys[n].append(k_rows)
            grads[n].append(g_rows)
    return keys, grads, sum(losses) / len(losses)


class UltraEdit(EditableModel):
    needs_training = False  # closed form: each edit is solved from the edit's own gradient factors

    causal_lm_only = True

    def __init__(self, model: nn.Module, config, weights=None, norms: Optional[nn.ModuleDict] = None):
        super().__init__(model, config, weights)
        self.layout = {n: weight_layout(model.get_submodule(module_name(n)), n, "UltraEdit") for n in self.inner_params}
        if norms is None:  # one normalisation per weight shape, shared by the weights of that shape
            norms = nn.ModuleDict()
            for _, d_in, d_out in self.layout.values():
                if self.shape_key(d_in, d_out) not in norms:
                    norms[self.shape_key(d_in, d_out)] = LifelongNorm(d_in + d_out)
        self.norms = norms
        # Set on the editor that edit() returns: name -> (K, A), the update K^T A as low-rank factors, for the
        # weights whose update had fewer positions than inputs.
        self.last_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def shape_key(d_in: int, d_out: int) -> str:
        return f"{d_in}x{d_out}"

    def norm_of(self, name: str) -> LifelongNorm:
        _, d_in, d_out = self.layout[name]
        return self.norms[self.shape_key(d_in, d_out)]

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> UltraEdit:
        edited = UltraEdit(self.model, self.config, weights=weights, norms=self.norms)
        edited.train(self.training)
        return edited

    def outer_parameters(self) -> List[nn.Parameter]:
        return []

    # The lifelong statistics are not ``running_statistics()``: those are MEND-style count/mean/m2 buffers that
    # training fills and an archive must hold; these start empty in every fresh run and are updated by edits alone.

    def lifelong_state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.norms.state_dict().items()}

    @torch.no_grad()
    def load_lifelong_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key, value in self.norms.state_dict().items():  # in place: every editor of with_weights shares them
            value.copy_(state[key])

    def low_rank_update(self, name: str):
        if name not in self.last_factors:
            return None
        keys, coeffs = self.last_factors[name]
        # W~ = W + dW (Conv1D) or W + dW^T (nn.Linear), dW = K^T A: the patch's W - alpha * (factors) with alpha = -1.
        return keys, coeffs, torch.tensor(-1.0, device=keys.device), self.layout[name][0]

    def _factors(self, batch: dict) -> Tuple[Dict[str, List[torch.Tensor]], Dict[str, List[torch.Tensor]], float]:
        """The keys and output gradients of every edited weight at the target positions, chunk by chunk, with the
        statistics updated after each chunk (in the order of ``inner_params``); and the mean edit loss. A chunk of
        fewer than ``chunk_size`` requests has its gradients scaled to a full chunk's (``chunked_factors``), so that its
        rows stand to the statistics as every full chunk's do."""

        def update(name: str, k_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
            self.norm_of(name).update(torch.cat((k_rows, g_rows), -1))

        return chunked_factors(self, batch, int(self.config.ultraedit.chunk_size), update, full_chunk_scale=True)

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        cfg = self.config.ultraedit
        keys, grads, loss = self._factors(batch)
        new_weights = dict(self.weights)
        factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for name in self.inner_params:
                fan_in_fan_out, d_in, _ = self.layout[name]
                k, g = torch.cat(keys[name]), torch.cat(grads[name])
                k_hat, g_hat = self.norm_of(name)(torch.cat((k, g), -1)).split([d_in, g.shape[-1]], -1)
                values = -float(cfg.lr) * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat
                delta, low_rank = ridge_update(k, values, float(cfg.ridge))
                if low_rank is not None:
                    factors[name] = low_rank
                w = self.current_weight(name)
                new_weights[name] = w + (delta if fan_in_fan_out else delta.T).to(w.dtype)
        edited = self.with_weights(new_weights)
        edited.last_factors = factors
        n_positions = sum(k.shape[0] for k in keys[self.inner_params[0]])
        return edited, {"loss/edit_inner": loss, "ultraedit/positions": float(n_positions)}
