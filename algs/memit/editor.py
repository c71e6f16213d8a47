"""MEMIT: mass-editing memory in a transformer (Meng, Sen Sharma, Andonian, Belinkov and Bau, 2023;
kmeng01/memit ``memit/memit_main.py``, ``compute_z.py``, ``compute_ks.py``).

For a batch of n requests and the edited weights W_1..W_L (MLP output projections of L blocks, in order; the last
block is the one whose output the targets are written to):

    z_j = the last edited block's output at request j's subject's last token that makes the model predict its
          target (vectors.py), for every j, on the model as it is
    for layer l = 1..L, each on the model the previous layers' updates changed:
        K = the keys of the n requests (inputs of W_l at the subject's last token, the mean over the plain prompt
            and the mean over the context templates), d_in x n
        R = (Z - the last block's current outputs) / (L - l + 1)        the residual spread over the layers left
        W_l~ = W_l + R ((lambda C + K K^T)^-1 K)^T                     in float64 (lambda: mom2_update_weight)

The update of each weight is low-rank (n), kept as factors for compact patches.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from algs.locate.editor import Layer, LocateEditor, apply_factors
from algs.locate.text import LocateRequest
from algs.locate.vectors import keys_at_subject, optimise_targets


class MEMIT(LocateEditor):
    group = "memit"
    template_starts = ("The", "Therefore", "Because", "I", "You")  # the original's generate_fast prompts
    template_lengths = ((10, 5),)  # "Be careful about changing this." (memit_main.get_context_templates)
    per_start = True

    def targets(self, weights, requests: List[LocateRequest]) -> Tuple[torch.Tensor, List[int]]:
        """Z (d x n): each request's optimised output of the last edited block, ``target_batch`` requests to a pass;
        and the Adam steps each took."""
        contexts = [t for group in self.context_templates() for t in group]
        block, size = self.layers[-1].block, int(self.settings.target_batch)
        vectors, steps = [], []
        for at in range(0, len(requests), size):
            z, taken = optimise_targets(
                self.model, weights, self.tokenizer, requests[at : at + size], contexts, block, self.settings
            )
            vectors.append(z)
            steps += taken
        return torch.cat(vectors, 0).T, steps

    def keys(self, weights, requests: List[LocateRequest], layer: Layer) -> torch.Tensor:
        """K (d_in x n): per request the mean over the template groups of the mean key in each group."""
        groups = self.context_templates()
        templates = [t.format(r.prompt) for r in requests for g in groups for t in g]
        subjects = [r.subject for r in requests for g in groups for _ in g]
        keys, _ = keys_at_subject(self.model, weights, self.tokenizer, templates, subjects, layer.rewrite)
        per_request, at = [], 0
        for _ in requests:
            means = []
            for g in groups:
                means.append(keys[at : at + len(g)].mean(0))
                at += len(g)
            per_request.append(torch.stack(means, 0).mean(0))
        return torch.stack(per_request, dim=0).T

    def current_outputs(self, weights, requests: List[LocateRequest]) -> torch.Tensor:
        _, outs = keys_at_subject(
            self.model,
            weights,
            self.tokenizer,
            [r.prompt for r in requests],
            [r.subject for r in requests],
            self.layers[-1].block,
        )
        return outs.T

    def layer_update(self, i: int, layer: Layer, keys, resid, weights) -> Tuple[torch.Tensor, torch.Tensor]:
        """(u, v): the update of layer i as factors, u (n x d_in), v (n x d_out)."""
        cov = self.second_moment(layer)
        keys, resid = keys.double(), resid.double()
        adj = torch.linalg.solve(float(self.settings.mom2_update_weight) * cov.double() + keys @ keys.T, keys)
        return adj.T, resid.T

    def after_edit(self, weights, requests: List[LocateRequest]) -> None:
        """What the edit leaves in the editor's state besides the weights (none)."""

    def edit(self, batch: dict, condition=None, diagnostics: bool = False):
        requests = self.requests(batch)
        weights = dict(self.weights)
        zs, steps = self.targets(weights, requests)
        factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            keys = self.keys(weights, requests, layer)
            resid = (zs - self.current_outputs(weights, requests)) / (len(self.layers) - i)
            u, v = self.layer_update(i, layer, keys, resid, weights)
            w = self.current_weight(layer.weight)
            factors[layer.weight] = (u.float(), v.float())
            weights[layer.weight] = apply_factors(w, u, v, self.layout[layer.weight][0]).to(w.dtype)
        self.after_edit(weights, requests)
        info = {f"{self.group}/requests": float(len(requests)), f"{self.group}/target_steps": sum(steps) / len(steps)}
        return self.edited_with(weights, factors, info)
