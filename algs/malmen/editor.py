"""MALMEN: Massive Editing for Large Language Models via Meta Learning (Tan, Zhang and Fu, ICLR 2024).

For an edited linear layer y = W x, one edit of N requests collects at every target position i (a position whose
output predicts a target token) the layer's input k_i and the gradient of the edit loss at its output d_i = dL/dy_i,
the factors of grad_W L = sum_i d_i k_i^T, as MEND does. A network per weight shape maps the standardised
z_i = [k_i; d_i] to pseudo factors [k~_i; d~_i], and each key is asked to move the layer's output by

    v_i = -eta_l * <k_i, k~_i> * d~_i        (eta_l the weight's learned step size)

Instead of MEND's sum of the rank-one shifts, the shifts of all the edits are aggregated per layer by the ridge
least-squares fit of the raw keys K (rows k_i) to the targets V (rows v_i):

    dW = argmin |K dW - V|^2 + e^lambda_l |dW|^2 = (K^T K + e^lambda_l I)^-1 K^T V     (d_in x d_out)

with lambda_l the weight's learned ridge, and the edited layer computes y~ = (W + dW^T) x (W + dW for GPT-2's
Conv1D, which stores W as d_in x d_out).

Training is memory-decoupled, as the original's: the language model's passes are made in chunks of edits
(``malmen.chunk_size``) with the update applied detached, the meta-loss's gradient G = dL/d(W + dW) accumulated on
the edited weights chunk by chunk (``meta_loss``); then (``meta_backward``) G is taken through the solve by hand,
dL/dV = K (K^T K + e^lambda I)^-1 G and dL/dlambda = -e^lambda <(K^T K + e^lambda I)^-1 G, dW>, and from V into
the network in chunks of rows (``malmen.net_chunk``). tests/test_malmen.py holds both to the original code's numbers.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.profiler import record_function

from algs.ultraedit.editor import chunked_factors, longest_first_chunks, ridge_update
from editable_model import EditableModel
from losses import IGNORE, kl_loc_loss
from meta_loss import StepContext, StepLosses
from models import edited_module_name as module_name
from models.inner_params import weight_layout
from utils import model_inputs


class MalmenNorm(nn.Module):
    """The running mean and spread of the rows z = [k; d] a network has seen, updated in training mode.

    The original's ``nets.RunningMeanStd``, operation for operation: ``m2`` accumulates ``B * var(batch) + count *
    B * delta^2 / (count + B)`` with the batch's unbiased variance (so it is not quite Welford's sum of squares),
    and z is standardised by ``(z - mean) / (sqrt(m2 / (count - 1 + eps)) + eps)``, eps the float32 machine
    epsilon. Named ``count`` / ``mean`` / ``m2`` as every editor's running statistics are. A batch of one row adds
    no variance (the original would make the statistics NaN)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        if b == 0:
            return
        total = self.count + b
        delta = x.mean(0) - self.mean
        batch_var = x.var(0) if b > 1 else torch.zeros_like(self.mean)
        self.mean += b * delta / total
        self.m2 += b * batch_var + self.count * b * delta.pow(2) / total
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps
        std = (self.m2 / (self.count - 1 + eps)).sqrt()
        return (x - self.mean) / (std + eps)


class MalmenBlock(nn.Module):
    """One residual block: h -> h + scale_l * clamp(h A B + b, 0) + shift_l, with A (size x rank) drawn from a
    standard normal and B zero (the identity at initialisation), and a scale and shift per edited weight l.

    MEND's layer (algs/mend/editor.py, ``LowRankResidual``) is the same map but scales and shifts before the clamp,
    and caps the rank at the width; MALMEN's ``nets.MALMENBlock`` does neither."""

    def __init__(self, size: int, rank: int, n_modules: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_modules, size)
        self.shift = nn.Embedding(n_modules, size)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = (h @ self.A @ self.B + self.bias).clamp(min=0)
        return h + self.scale(idx) * x + self.shift(idx)


class MalmenNet(nn.Module):
    """The network of one weight shape (d_in x d_out), shared by the edited weights of that shape: the normalisation
    of [k; d], ``n_blocks`` residual blocks, and per edited weight its step size ``lr`` and log-ridge ``lamda``
    (the original's names)."""

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int, cfg):
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        self.normalizer = MalmenNorm(key_size + value_size)
        self.blocks = nn.ModuleList(MalmenBlock(key_size + value_size, rank, n_modules) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)
        nn.init.constant_(self.lr.weight, float(cfg.edit_lr))
        nn.init.constant_(self.lamda.weight, float(cfg.log_ridge))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor, idx: torch.Tensor):
        h = self.normalizer(torch.cat((keys, grads), -1))
        for block in self.blocks:
            h = block(h, idx)
        return h.split([self.key_size, self.value_size], -1)

    def shifts(self, keys: torch.Tensor, grads: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The output shifts v_i = -eta * <k_i, k~_i> * d~_i of rows (k_i, d_i)."""
        pseudo_keys, pseudo_grads = self(keys, grads, idx)
        return -self.lr(idx) * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads


def _merge_metrics(parts: List[Tuple[dict, int]]) -> Dict[str, torch.Tensor]:
    """``losses.masked_log_probs`` of a whole batch from those of its chunks (each with its number of sequences that
    have a target): token-weighted means, sequence-weighted accuracy."""
    tokens = sum(p["n_tokens"].float() for p, _ in parts).clamp(min=1)
    seqs = max(sum(n for _, n in parts), 1)
    nll_sum = sum(p["nll_sum"] for p, _ in parts)
    return {
        "nll": nll_sum / tokens,
        "log_prob": -nll_sum / tokens,
        "prob": sum(p["prob"] * p["n_tokens"] for p, _ in parts) / tokens,
        "acc": sum(p["acc"] * n for p, n in parts) / seqs,
        "acc_tok": sum(p["acc_tok"] * p["n_tokens"] for p, _ in parts) / tokens,
        "nll_sum": nll_sum,
        "n_tokens": tokens,
    }


def _targeted(labels: torch.Tensor) -> int:
    """The rows of a causal-LM batch with a target the loss reads (labels after the first position)."""
    return int((labels[:, 1:] != IGNORE).any(-1).sum())


class LocalityMetrics:
    """In ``StepLosses.pre_loc_logits`` / ``post_loc_logits``: the figures the trainer reads from the locality
    logits (``loc_loss_fn``), computed chunk by chunk in ``meta_loss``, so that the logits of a whole batch of
    hundreds of locality inputs (B x T x vocabulary, twice) are never held at once."""

    def __init__(self, metrics: Dict[str, torch.Tensor]):
        self.metrics = metrics

    def detach(self) -> LocalityMetrics:
        return self


class MALMEN(EditableModel):
    causal_lm_only = True
    #: The config group of the editor's settings (an editor built on this one, RLEdit, reads its own).
    settings_group = "malmen"
    #: False: the normalisation's statistics are updated by training edits only; True: by every edit (RLEdit's).
    stats_while_editing = False

    def __init__(self, model: nn.Module, config, weights=None, net: Optional[nn.ModuleDict] = None):
        super().__init__(model, config, weights)
        cfg = self.settings
        self.layout = {n: weight_layout(model.get_submodule(module_name(n)), n, "MALMEN") for n in self.inner_params}
        # Which network serves each weight (one per shape) and the weight's index within it, in the order of
        # inner_params (the original's name2idx).
        self.net_of: Dict[str, Tuple[str, int]] = {}
        counts: Dict[str, int] = {}
        for name, (_, d_in, d_out) in self.layout.items():
            key = f"{d_in}x{d_out}"
            self.net_of[name] = key, counts.get(key, 0)
            counts[key] = counts.get(key, 0) + 1
        if net is None:
            net = nn.ModuleDict()
            for name, (_, d_in, d_out) in self.layout.items():
                key = self.net_of[name][0]
                if key not in net:
                    net[key] = MalmenNet(d_in, d_out, int(cfg.rank), int(cfg.n_blocks), counts[key], cfg)
        self.net = net
        # Set on the editor that edit() returns: name -> (K, A), the update K^T A as low-rank factors, for the
        # weights whose update had fewer positions than inputs.
        self.last_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def loc_loss_fn(self, logits, labels: torch.Tensor) -> dict:
        """The locality figures: those ``meta_loss`` computed (:class:`LocalityMetrics`), or of logits."""
        if isinstance(logits, LocalityMetrics):
            return logits.metrics
        return self.edit_loss_fn(logits, labels)

    @property
    def settings(self):
        """The editor's settings group (``malmen.*``; ``rledit.*`` for RLEdit)."""
        return getattr(self.config, self.settings_group)

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> MALMEN:
        edited = type(self)(self.model, self.config, weights=weights, net=self.net)
        edited.train(self.training)
        return edited

    def outer_parameters(self) -> List[nn.Parameter]:
        return list(self.net.parameters())

    def outer_lr(self) -> float:
        return float(self.settings.lr)

    def step_size_lr(self) -> Optional[float]:
        return None  # the step sizes and ridges train with the network, as the original's single Adam

    def running_statistics(self) -> Dict[str, nn.Module]:
        return {name: m for name, m in self.net.named_modules() if isinstance(m, MalmenNorm)}

    def low_rank_update(self, name: str):
        if name not in self.last_factors:
            return None
        keys, coeffs = self.last_factors[name]
        # W~ = W + dW (Conv1D) or W + dW^T (nn.Linear), dW = K^T A: the patch's W - alpha * (factors) with alpha = -1.
        return keys, coeffs, torch.tensor(-1.0, device=keys.device), self.layout[name][0]

    # -- the pieces of an edit ------------------------------------------------------------------------------------
    def _net(self, name: str) -> Tuple[MalmenNet, torch.Tensor]:
        key, i = self.net_of[name]
        net = self.net[key]
        return net, torch.tensor([i], device=net.lr.weight.device)

    def _factors(self, batch: dict):
        """Keys and output gradients per edited weight (concatenated over the chunks of ``malmen.chunk_size`` edits),
        the statistics updated after each chunk in training mode; and the mean edit loss."""

        def update(name: str, k_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
            if self.training or self.stats_while_editing:
                self._net(name)[0].normalizer.update(torch.cat((k_rows, g_rows), -1))

        # A partial chunk's gradients are scaled to a full chunk's (the network is trained on full chunks; the
        # original only ever edits in full chunks): one edit alone would otherwise ask for chunk_size times the shift.
        keys, grads, loss = chunked_factors(self, batch, int(self.settings.chunk_size), update, full_chunk_scale=True)
        return {n: torch.cat(k) for n, k in keys.items()}, {n: torch.cat(g) for n, g in grads.items()}, loss

    def _shifts(self, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """The targets V (N x d_out) of one weight, in chunks of ``malmen.net_chunk`` rows."""
        net, idx = self._net(name)
        step = int(self.settings.net_chunk)
        return torch.cat([net.shifts(keys[s : s + step], grads[s : s + step], idx) for s in range(0, len(keys), step)])

    def _updates(self, keys: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]):
        """The least-squares update dW (d_in x d_out) of every edited weight, and its low-rank factors where it has
        them (``ultraedit.editor.ridge_update``: the N x N system when N < d_in, the same solution)."""
        updates, factors = {}, {}
        with torch.no_grad():
            for name in self.inner_params:
                net, idx = self._net(name)
                values = self._shifts(name, keys[name], grads[name])
                ridge = net.lamda(idx).exp().item()
                updates[name], low_rank = ridge_update(keys[name], values, ridge)
                if low_rank is not None:
                    factors[name] = low_rank
        return updates, factors

    def _edited_weights(self, updates: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        new_weights = dict(self.weights)
        for name, delta in updates.items():
            w = self.current_weight(name)
            new_weights[name] = w + (delta if self.layout[name][0] else delta.T).to(w.dtype)
        return new_weights

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        keys, grads, loss = self._factors(batch)
        updates, factors = self._updates(keys, grads)
        edited = self.with_weights(self._edited_weights(updates))
        edited.last_factors = factors
        n_positions = keys[self.inner_params[0]].shape[0]
        return edited, {"loss/edit_inner": loss, "malmen/positions": float(n_positions)}

    # -- training in stages ------------------------------------------------------------------------------------
    def _detached_edit(self, batch: dict, training: bool):
        """The edit of ``batch`` (an ``edit_inner``) as training makes it: the factors chunk by chunk, the update solved
        without a graph, and the edited weights as leaves that the meta-loss is back-propagated to (``meta_backward``
        takes their gradient on into the network). Returns (leaves, what ``_network_gradients`` needs, the edit
        loss)."""
        keys, grads, inner_loss = self._factors(batch)
        updates, _ = self._updates(keys, grads)
        leaves = {n: w.detach().requires_grad_(training) for n, w in self._edited_weights(updates).items()}
        return leaves, {"keys": keys, "grads": grads, "updates": updates, "leaves": leaves}, inner_loss

    def _rephrasing_losses(self, edited: MALMEN, outer: dict, weight: float, backward: Callable, reference=None):
        """The edited model's loss on the rephrasings ``outer``, chunk by chunk (``chunk_size`` examples, longest
        first): each chunk's ``weight * cedit * (its mean NLL)`` handed to ``backward`` at once. Returns the sum of
        those losses, the chunks' metrics, and those of ``reference`` (the model before the edit) when given."""
        scale = weight * self.config.cedit
        trained, post_parts, pre_parts = torch.zeros(()), [], []
        for rows in longest_first_chunks(outer["attention_mask"], int(self.settings.chunk_size)):
            chunk = {k: v[rows] for k, v in outer.items() if isinstance(v, torch.Tensor)}
            n_seq = _targeted(chunk["labels"])
            metrics = edited.loss_with(chunk, {})
            backward(scale * metrics["nll"])
            trained = trained + scale * metrics["nll"].detach()
            post_parts.append(({k: v.detach() for k, v in metrics.items()}, n_seq))
            if reference is not None:
                pre_parts.append((reference.loss_with(chunk, {}), n_seq))
        return trained, post_parts, pre_parts

    def _locality_losses(self, reference: MALMEN, edited: MALMEN, loc: dict, weight: float, backward, lower):
        """The KL from ``reference`` (the model before the edit) to ``edited`` on the locality inputs ``loc``, chunk
        by chunk: each chunk's ``weight * cloc * (its mean KL)`` handed to ``backward`` at once. Returns the sum of
        those losses, the KL summed over the positions, and the chunks' figures before and after (for the
        drawdown)."""
        scale = weight * self.config.cloc
        mask = loc.get("decoder_attention_mask", loc["attention_mask"])
        trained, kl_sum, pre_parts, post_parts = torch.zeros(()), torch.zeros(()), [], []
        for rows in longest_first_chunks(loc["attention_mask"], int(self.settings.chunk_size)):
            chunk = model_inputs({k: v[rows] for k, v in loc.items() if isinstance(v, torch.Tensor)})
            # The blocks below the edits run once for both passes (the trainer's LowerBlocks, if any).
            with torch.no_grad(), lower.record() if lower else contextlib.nullcontext():
                pre = reference(**chunk)
            with lower.replay(edited.weights) if lower else contextlib.nullcontext():
                post = edited(**chunk)
            kl = kl_loc_loss(pre, post, mask[rows])
            backward(scale * kl)
            trained = trained + scale * kl.detach()
            kl_sum = kl_sum + kl.detach() * mask[rows].sum()
            if "labels" in loc:  # the drawdown's figures, chunk by chunk
                labels, n_seq = loc["labels"][rows], _targeted(loc["labels"][rows])
                with torch.no_grad():
                    pre_parts.append((self.edit_loss_fn(pre, labels), n_seq))
                    post_parts.append((self.edit_loss_fn(post.detach(), labels), n_seq))
        return trained, kl_sum, pre_parts, post_parts

    def meta_loss(self, batch: dict, step: StepContext) -> StepLosses:
        """One meta-step, as the original's ``BaseEditor.train``: the factors of the edits (``edit_inner``) chunk by
        chunk, the update solved and applied detached, then the edited model's loss on the rephrasings
        (``edit_outer``) and its KL to the unedited model on the locality inputs (``loc``), each chunk of
        ``malmen.chunk_size`` examples back-propagated at once to the edited weights only. The gradient's loss is
        the original's: the sum over chunks of cedit * (the chunk's mean NLL) + cloc * (the chunk's mean KL); the
        logged ``edit`` and ``loc`` are the means over all tokens, as for every other editor."""
        cfg = self.config
        start = time.perf_counter()
        with record_function("step/edit"):
            leaves, saved, inner_loss = self._detached_edit(batch["edit_inner"], step.training)
            edited = self.with_weights(leaves)
        edit_time = time.perf_counter() - start
        targets = [leaves[n] for n in self.inner_params]

        def backward(loss: torch.Tensor) -> None:
            if step.training:
                torch.autograd.backward(loss, inputs=targets)

        outer, loc = batch["edit_outer"], batch["loc"]
        try:
            with torch.set_grad_enabled(step.training), step.checkpointing(self.model):
                with record_function("step/post_edit_equivalence"):
                    reference = None if step.training else self
                    trained, post_parts, pre_parts = self._rephrasing_losses(edited, outer, 1.0, backward, reference)
                with record_function("step/post_edit_locality"):
                    trained_loc, kl_sum, pre_loc, post_loc = self._locality_losses(
                        self, edited, loc, 1.0, backward, step.lower
                    )
        finally:
            if step.lower:
                step.lower.clear()
        mask = loc.get("decoder_attention_mask", loc["attention_mask"])
        post_edit = _merge_metrics(post_parts)
        l_edit, l_loc = post_edit["nll"], kl_sum / mask.sum().clamp(min=1)
        total_edit = cfg.cedit * l_edit + cfg.cloc * l_loc
        return StepLosses(
            loss=trained + trained_loc,
            total=total_edit,
            total_edit=total_edit,
            edit=l_edit,
            loc=l_loc,
            post_edit=post_edit,
            pre_loc_logits=LocalityMetrics(_merge_metrics(pre_loc) if pre_loc else {}),
            post_loc_logits=LocalityMetrics(_merge_metrics(post_loc) if post_loc else {}),
            pre_edit=None if step.training else _merge_metrics(pre_parts),
            info={"loss/edit_inner": inner_loss, "malmen/positions": float(len(saved["keys"][self.inner_params[0]]))},
            edit_time=edit_time,
            saved=saved,
        )

    def _network_gradients(self, saved: dict, extra: Optional[Dict[str, torch.Tensor]] = None) -> Dict[int, Tensor]:
        """The gradient of the meta-loss with respect to the network's parameters (by ``id``), from the gradient G at
        the edited weights that the meta-loss left on the leaves of ``_detached_edit`` (plus ``extra``, by weight
        name, in the leaves' layout), taken through the least-squares solve by hand, as the original's
        ``update_hypernet``: with A = K^T K + e^lambda I, dL/dlambda = -e^lambda <A^-1 G, dW> and dL/dV = K A^-1 G,
        then from V into the network, ``net_chunk`` rows at a time (each chunk's graph freed before the next)."""
        params = self.outer_parameters()
        total: Dict[int, torch.Tensor] = {}

        def add(loss: torch.Tensor) -> None:
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    total[id(p)] = total[id(p)] + g if id(p) in total else g

        step = int(self.settings.net_chunk)
        with torch.enable_grad():
            for name in self.inner_params:
                net, idx = self._net(name)
                keys, grads, delta = saved["keys"][name], saved["grads"][name], saved["updates"][name]
                leaf = saved["leaves"][name]
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                if extra is not None and name in extra:
                    grad = grad + extra[name]
                grad = (grad if self.layout[name][0] else grad.T).float()
                with torch.no_grad():
                    ridge = net.lamda(idx).exp()
                    eye = torch.eye(keys.shape[1], device=keys.device, dtype=keys.dtype)
                    solved = torch.linalg.solve(keys.T @ keys + ridge * eye, grad)
                    lamda_grad = -ridge * (solved * delta).sum()
                    values_grad = keys @ solved
                add((lamda_grad * net.lamda(idx)).sum())
                for s in range(0, len(keys), step):
                    values = net.shifts(keys[s : s + step], grads[s : s + step], idx)
                    add((values_grad[s : s + step] * values).sum())
        return total

    def meta_backward(self, losses: StepLosses, backward: Callable[[torch.Tensor], None]) -> None:
        """The gradient G of the meta-loss at the edited weights (accumulated by ``meta_loss``) taken into the network
        (``_network_gradients``); the trainer gets it as one surrogate loss, sum_p <p, dL/dp>, whose gradient is
        exactly dL/dp."""
        backward(surrogate_loss(self.outer_parameters(), self._network_gradients(losses.saved), losses.loss))


def surrogate_loss(params: List[nn.Parameter], grads: Dict[int, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """sum_p <p, g_p> over the parameters with a gradient in ``grads`` (by ``id``): a loss whose gradient is exactly
    ``grads``, for the trainer's backward (a zero loss with a graph when there is none)."""
    surrogate = sum((p * grads[id(p)]).sum() for p in params if id(p) in grads)
    return surrogate if torch.is_tensor(surrogate) else like.new_zeros(()).requires_grad_(True)
