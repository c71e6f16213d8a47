"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

For an edited linear layer y = W x, the gradient of the edit loss over B token positions is
grad_W = sum_i delta_i x_i^T (delta_i = dL/dy_i). MEND captures the rank-one factors (x_i, delta_i)
with hooks, maps them through a small MLP g to (u~_i, v~_i), and edits W~ = W - alpha * sum_i v~_i u~_i^T.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from editable_model import EditableModel
from models import edited_module_name as module_name
from models.inner_params import capture_calls, weight_layout

LOG = logging.getLogger(__name__)

# mend.update_rule: "paper" edits W~ = W - alpha * g~ (Mitchell et al., eq. 3); "original" W~ = W + alpha * g~, as the
# original code (eric-mitchell/mend, algs/mend.py: updates = lr * g, then p + updates) applies it.
UPDATE_RULES = ("paper", "original")


# ---------------------------------------------------------------------------------------------
# The gradient transform g
# ---------------------------------------------------------------------------------------------
class RunningNorm(nn.Module):
    """Running mean and std of feature vectors (Welford/Chan update, one sample per row).

    The statistics are buffers, saved with the editor. They update only in training mode.
    """

    def __init__(self, dim: int, eps: float = 1e-7):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        k = self.count.item()
        total = k + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (k * n / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count.item() < 2:
            if self.training:  # the very first rows seen in training: nothing to standardise with yet
                return x
            raise RuntimeError(
                "MEND's input normalisation has seen fewer than 2 samples: train the editor first (or load a "
                "trained archive), or set mend.norm=False."
            )
        std = (self.m2 / (self.count - 1)).sqrt().to(x.dtype)
        return (x - self.mean) / (std + self.eps)


class LowRankResidual(nn.Module):
    """One layer of the editor MLP: h -> act + h (init 'id') or h -> act (init 'xavier'), act = clamp(U V h + b, 0).

    U is (d x r), V (r x d). Every layer clamps, the last one included, and the shared editor scales and shifts the
    pre-activation per edited weight (``mode``) before the clamp. The clamp (not ReLU) has gradient 1 at 0, so that
    U, which starts at zero under init 'id', receives gradients from the first step.

    Initialisation, as in the original code's ``nn.LRLinear``: 'id' draws V from a standard normal (std 1) and sets
    U to zero (the layer is the identity); 'xavier' draws U and V xavier-uniform (ReLU gain on U, gain 1 on V) and
    drops the residual.
    """

    def __init__(self, dim: int, rank: int, init: str, n_modes: Optional[int]):
        super().__init__()
        if init not in ("id", "xavier"):
            raise ValueError(f"mend.init={init!r}: expected 'id' or 'xavier'.")
        self.residual = init == "id"
        self.v = nn.Parameter(torch.empty(rank, dim))
        self.u = nn.Parameter(torch.empty(dim, rank))
        self.bias = nn.Parameter(torch.zeros(dim))
        if self.residual:
            nn.init.normal_(self.v, std=1.0)
            nn.init.zeros_(self.u)
        else:
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        if n_modes is not None:
            self.scale = nn.Embedding(n_modes, dim)
            self.shift = nn.Embedding(n_modes, dim)
            nn.init.ones_(self.scale.weight)
            nn.init.zeros_(self.shift.weight)
        else:
            self.scale = self.shift = None

    def forward(self, h: torch.Tensor, mode=None) -> torch.Tensor:
        """``mode``: the index of the edited weight within a shared transform, for all rows (an int) or per row (a
        LongTensor of shape (N,), when the rows of several weights go through in one call)."""
        pre = (h @ self.v.t()) @ self.u.t() + self.bias  # (N, d)
        if self.scale is not None and mode is not None:
            idx = mode if isinstance(mode, torch.Tensor) else torch.tensor(mode, device=h.device)
            pre = pre * self.scale(idx) + self.shift(idx)
        act = pre.clamp(min=0)
        return h + act if self.residual else act


class IDMLP(nn.Module):
    """n_hidden + 1 low-rank layers (r = min(rank, d)); the identity map at initialisation with init='id'."""

    def __init__(self, dim: int, n_hidden: int, rank: int, init: str = "id", n_modes: Optional[int] = None):
        super().__init__()
        r = min(rank, dim)
        self.layers = nn.ModuleList(LowRankResidual(dim, r, init=init, n_modes=n_modes) for _ in range(n_hidden + 1))

    def forward(self, h: torch.Tensor, mode=None) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, mode)
        return h


class GradientTransform(nn.Module):
    """g_l: maps the gradient factors (u = x, v = delta) of one weight shape to pseudo-gradient factors."""

    def __init__(self, x_dim: int, delta_dim: int, cfg, n_modes: Optional[int] = None):
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        self.use_norm = cfg.norm
        self.combine = cfg.combine
        self.norm_u = RunningNorm(x_dim)
        self.norm_v = RunningNorm(delta_dim)

        def mlp(dim):
            return IDMLP(dim, cfg.n_hidden, cfg.rank, cfg.init, n_modes)

        if cfg.combine:
            self.mlp = mlp(x_dim + delta_dim)
            self.mlp_u = self.mlp_v = None
        else:
            transform_u, transform_v = True, True
            if cfg.one_sided:  # transform only the smaller side
                transform_u, transform_v = x_dim <= delta_dim, delta_dim < x_dim
            elif cfg.x_only:
                transform_v = False
            elif cfg.delta_only:
                transform_u = False
            self.mlp = None
            self.mlp_u = mlp(x_dim) if transform_u else None
            self.mlp_v = mlp(delta_dim) if transform_v else None

    def forward(self, u: torch.Tensor, v: torch.Tensor, mode=None):
        return self.transform(*self.prepare(u, v), mode)

    def prepare(self, u: torch.Tensor, v: torch.Tensor):
        """The rows that carry signal, in float32, standardised (after updating the statistics, in training)."""
        u, v = u.float(), v.float()
        keep = (u != 0).any(-1) & (v != 0).any(-1)  # drop positions with no signal (padding, masked labels)
        u, v = u[keep], v[keep]
        if self.training:
            self.norm_u.update(u)
            self.norm_v.update(v)
        if self.use_norm:
            u, v = self.norm_u(u), self.norm_v(v)
        return u, v

    def transform(self, u: torch.Tensor, v: torch.Tensor, mode=None):
        """The MLP(s) on prepared rows; ``mode`` as in :meth:`LowRankResidual.forward`."""
        if self.combine:
            out = self.mlp(torch.cat([u, v], -1), mode)
            return out[:, : self.x_dim], out[:, self.x_dim :]
        if self.mlp_u is not None:
            u = self.mlp_u(u, mode)
        if self.mlp_v is not None:
            v = self.mlp_v(v, mode)
        return u, v


# ---------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------
class MEND(EditableModel):
    def __init__(
        self,
        model: nn.Module,
        config,
        weights=None,
        mend: Optional[nn.ModuleDict] = None,
        edit_lrs: Optional[nn.Parameter] = None,
    ):
        super().__init__(model, config, weights)
        self.layout = {}  # param name -> (fan_in_fan_out, d_in, d_out)
        for name in self.inner_params:
            self.layout[name] = weight_layout(model.get_submodule(module_name(name)), name, "MEND")

        # Which transform serves each weight, and at which index ("mode") within a shared transform.
        self.transform_of: Dict[str, Tuple[str, Optional[int]]] = {}
        groups: Dict[str, List[str]] = {}
        for name, (_, d_in, d_out) in self.layout.items():
            key = f"{d_in}x{d_out}" if config.mend.shared else name.replace(".", "#")
            groups.setdefault(key, []).append(name)
        for key, names in groups.items():
            for i, name in enumerate(names):
                self.transform_of[name] = (key, i if config.mend.shared else None)

        if mend is None:
            mend = nn.ModuleDict()
            for key, names in groups.items():
                _, d_in, d_out = self.layout[names[0]]
                n_modes = len(names) if config.mend.shared else None
                mend[key] = GradientTransform(d_in, d_out, config.mend, n_modes)
        self.mend = mend
        if edit_lrs is None:
            edit_lrs = nn.Parameter(torch.full((len(self.inner_params),), float(config.mend.edit_lr)))
        self.edit_lrs = edit_lrs
        if config.mend.update_rule not in UPDATE_RULES:
            raise ValueError(
                f"mend.update_rule={config.mend.update_rule!r}: expected one of {', '.join(UPDATE_RULES)}."
            )
        # W~ = W - alpha * g~ (the paper) or W + alpha * g~ (the original code; a positive initial alpha steps uphill).
        self.update_sign = -1.0 if config.mend.update_rule == "paper" else 1.0
        # Set on the editor that edit() returns: name -> (u~, v~) of the update it applied.
        self.last_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def outer_parameters(self) -> List[nn.Parameter]:
        return list(self.mend.parameters()) + [self.edit_lrs]

    def step_size_parameters(self) -> List[nn.Parameter]:
        return [self.edit_lrs]

    def outer_lr(self) -> float:
        return float(self.config.mend.lr)

    def step_size_lr(self) -> float:
        return float(self.config.mend.lr_lr)

    def descent_step_sizes(self) -> torch.Tensor:
        """The step sizes alpha_l of the paper's rule W~ = W - alpha_l * g~, whichever rule the editor applies."""
        return -self.update_sign * self.edit_lrs

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> MEND:
        edited = MEND(self.model, self.config, weights=weights, mend=self.mend, edit_lrs=self.edit_lrs)
        edited.train(self.training)
        return edited

    def low_rank_update(self, name: str):
        if name not in self.last_factors:
            return None
        u, v = self.last_factors[name]
        alpha = self.descent_step_sizes()[self.inner_params.index(name)].detach().clone()
        return u, v, alpha, self.layout[name][0]

    def activation_bytes(self, n_tokens: int) -> int:
        """The editor MLPs on the edit's token positions (fp32): the normalised inputs and their concatenation, and
        per residual layer its input and low-rank projection (counted with saved_tensors_hooks)."""
        n_layers, rank = self.config.mend.n_hidden + 1, self.config.mend.rank
        total = 0
        for name in self.inner_params:
            s = sum(self.model.get_parameter(name).shape)
            total += n_tokens * 4 * (2 * s + n_layers * (s + min(rank, s)))
        return total

    def running_statistics(self) -> Dict[str, nn.Module]:
        return {name: m for name, m in self.mend.named_modules() if isinstance(m, RunningNorm)}

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        names = self.inner_params
        with torch.enable_grad():
            # The edit loss at the current weights, through fresh leaves: the base model's own parameters stay
            # frozen and untouched. Autograd is asked for the gradients at the edited layers' outputs (delta) and,
            # only when the diagnostics are wanted, for the true weight gradients too (a d_in x d_out product each).
            leaves = {n: self.current_weight(n).detach().requires_grad_(True) for n in names}
            with capture_calls(self.model, [module_name(n) for n in names]) as factors:
                loss = self.loss_with(batch, leaves)["nll"]
            outputs = [out for n in names for out in factors[module_name(n)]["out"]]
            wanted = outputs + ([leaves[n] for n in names] if diagnostics else [])
            grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
        deltas, true_grads = iter(grads[: len(outputs)]), grads[len(outputs) :]

        rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (x (N, d_in), delta (N, d_out))
        for name in names:
            rec = factors[module_name(name)]
            delta = [g for g in (next(deltas) for _ in rec["out"]) if g is not None]
            if not rec["x"] or not delta:
                raise RuntimeError(
                    f"no activations or gradients were captured for {name}; is it used by the forward pass?"
                )
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in rec["x"]])
            rows[name] = x, torch.cat([d.reshape(-1, d.shape[-1]) for d in delta])

        info = {"loss/edit_inner": loss.item()}
        # The editor MLPs build a graph only when the editor trains; an evaluation or applied edit keeps none.
        graph = torch.is_grad_enabled() and (self.training or not self.config.speed.no_graph_in_evaluation)
        with torch.set_grad_enabled(graph):
            factors_out = self._transform(rows)
            new_weights = dict(self.weights)
            for i, name in enumerate(names):
                u, v = factors_out[name]
                pseudo = u.t() @ v if self.layout[name][0] else v.t() @ u  # W's own layout
                if diagnostics:
                    with torch.no_grad():
                        info[f"grad/cos{i}"] = F.cosine_similarity(
                            true_grads[i].reshape(-1).float(), pseudo.detach().reshape(-1), dim=0
                        ).item()
                        info[f"grad/true_mag{i}"] = true_grads[i].norm().item()
                        info[f"grad/pseudo_mag{i}"] = pseudo.detach().norm().item()
                w = self.current_weight(name)
                new_weights[name] = w + self.update_sign * self.edit_lrs[i] * pseudo.to(w.dtype)

        edited = self.with_weights(new_weights)
        # The update as low-rank factors: W~ = W - alpha * (v~^T u~) (nn.Linear) or (u~^T v~) (Conv1D), with
        # u~ (N, d_in), v~ (N, d_out) over the N positions that carried gradient and alpha = descent_step_sizes()[i].
        edited.last_factors = {name: (u.detach(), v.detach()) for name, (u, v) in factors_out.items()}
        return edited, info

    def _transform(self, rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
        """(u~, v~) for each edited weight from its (x, delta) rows.

        The rows of each weight are prepared (filtered, standardised) in the order of ``inner_params``, so that the
        running statistics of a shared transform are updated and applied exactly as one weight at a time would.
        With ``speed.batched_mlp`` the prepared rows of all the weights that share a transform then go through its
        MLP in one call (the weights read once instead of once per edited weight), each row with its weight's mode.
        """
        out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        if not self.config.speed.batched_mlp:
            for name, (x, delta) in rows.items():
                key, mode = self.transform_of[name]
                out[name] = self.mend[key](x, delta, mode)
            return out
        groups: Dict[str, List[str]] = {}
        for name in rows:
            groups.setdefault(self.transform_of[name][0], []).append(name)
        for key, group in groups.items():
            transform = self.mend[key]
            prepared = [transform.prepare(*rows[name]) for name in group]
            sizes = [u.shape[0] for u, _ in prepared]
            mode = self.transform_of[group[0]][1]
            if mode is not None:
                device = prepared[0][0].device
                mode = torch.cat(
                    [torch.full((n,), self.transform_of[name][1], device=device) for name, n in zip(group, sizes)]
                )
            u, v = transform.transform(torch.cat([u for u, _ in prepared]), torch.cat([v for _, v in prepared]), mode)
            for name, u_i, v_i in zip(group, u.split(sizes), v.split(sizes)):
                out[name] = u_i, v_i
        return out
