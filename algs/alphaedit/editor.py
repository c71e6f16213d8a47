"""AlphaEdit: null-space constrained knowledge editing (Fang, Jiang, Wang, Ma, Shi, Wang, He and Chua, ICLR 2025;
jianghoucheng/AlphaEdit ``AlphaEdit/AlphaEdit_main.py``, ``experiments/evaluate.py`` ``get_project``).

MEMIT's targets, keys and residual spread (algs/memit/editor.py), with another solve per layer:

    P = U_0 U_0^T            U_0 the eigenvectors of the key statistics C whose eigenvalues are below
                             nullspace_threshold: a projection onto (nearly) the null space of the preserved keys
    dW = (P (K K^T + C_prev) + L2 I)^-1 P K R^T      (d_in x d_out, float32)
    W~ = W + dW

C_prev is the sum of K K^T over every earlier edit of the run, on the model as each left it (after each edit, the
keys of its requests on the edited model are added): the editor's lifelong state, so that each edit of a sequential
run spares the keys of the ones before it, and independent edits start again from zero (``Editor.start_sequence``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from algs.locate.editor import Layer
from algs.locate.text import LocateRequest
from algs.memit.editor import MEMIT


def null_space_projection(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """U_0 U_0^T, U_0 the left singular vectors of ``cov`` whose singular values are below ``threshold``."""
    u, s, _ = torch.linalg.svd(cov.float().cpu(), full_matrices=False)
    small = u[:, (s < threshold).nonzero(as_tuple=True)[0]]
    return (small @ small.T).to(cov.device)


class AlphaEdit(MEMIT):
    group = "alphaedit"

    def initial_lifelong(self) -> Dict[str, torch.Tensor]:
        out = {}
        for name in self.inner_params:
            _, d_in, _ = self.layout[name]
            out[f"cache_c.{name}"] = torch.zeros(d_in, d_in, device=self.model.get_parameter(name).device)
        return out

    def projection(self, layer: Layer) -> torch.Tensor:
        threshold = float(self.settings.nullspace_threshold)
        return self.derived(layer, f"null-space<{threshold}", lambda c: null_space_projection(c, threshold))

    def layer_update(self, i: int, layer: Layer, keys, resid, weights) -> Tuple[torch.Tensor, torch.Tensor]:
        p = self.projection(layer)
        cache = self.shared.lifelong[f"cache_c.{layer.weight}"]
        eye = torch.eye(keys.shape[0], dtype=torch.float, device=keys.device)
        lhs = p @ (keys @ keys.T + cache) + float(self.settings.L2) * eye
        # dW = lhs^-1 P K R^T, kept as the factors (lhs^-1 P K)^T (n x d_in) and R^T (n x d_out)
        return torch.linalg.solve(lhs, p @ keys).T, resid.T

    @torch.no_grad()
    def after_edit(self, weights, requests: List[LocateRequest]) -> None:
        for layer in self.layers:
            keys = self.keys(weights, requests, layer)
            self.shared.lifelong[f"cache_c.{layer.weight}"] += keys @ keys.T
