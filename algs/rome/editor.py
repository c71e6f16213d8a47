"""ROME: rank-one model editing (Meng, Bau, Andonian and Belinkov, 2022; kmeng01/rome ``rome/rome_main.py``,
``compute_u.py``, ``compute_v.py``).

For the one edited weight W (the output projection of an MLP, y = W k) and each request in turn:

    u = C^-1 k* / |C^-1 k*|        k* the key at the subject's last token, averaged over the context templates,
                                   C the second moment of the layer's keys (key_stats.py)
    v* = the MLP output at the subject's last token that makes the model predict the target (vectors.py)
    w = (v* - W k) / (k . u)       k, W k the key and output on the plain prompt
    W~ = W + w u^T

Each request of a batch is applied to the model the previous ones edited, as the original's apply_rome_to_model
does; the batch's update is the sum of the rank-one ones.
"""

from __future__ import annotations

import torch

from algs.locate.editor import LocateEditor, apply_factors
from algs.locate.vectors import keys_at_subject, optimise_target


class ROME(LocateEditor):
    group = "rome"
    template_starts = ("",)  # the tokenizer's BOS (GPT-2: "<|endoftext|>"), as the original's generate_fast prompt
    template_lengths = ((5, 10), (10, 10))  # the original's context_template_length_params
    per_start = False

    def flat_templates(self):
        return [t for group in self.context_templates() for t in group]

    def left_vector(self, weights, request, layer) -> torch.Tensor:
        templates = self.flat_templates()
        keys, _ = keys_at_subject(
            self.model,
            weights,
            self.tokenizer,
            [t.format(request.prompt) for t in templates],
            [request.subject] * len(templates),
            layer.rewrite,
        )
        u = keys.mean(0)
        inverse = self.derived(layer, "inverse", lambda c: torch.inverse(c).float())
        u = (inverse @ u.unsqueeze(1)).squeeze()
        return u / u.norm()

    def right_vector(self, weights, request, layer, u: torch.Tensor) -> torch.Tensor:
        target = optimise_target(
            self.model, weights, self.tokenizer, request, self.flat_templates(), layer.mlp, self.settings
        )
        k, out = keys_at_subject(
            self.model, weights, self.tokenizer, [request.prompt], [request.subject], layer.rewrite
        )
        return (target - out[0]) / torch.dot(k[0], u)

    def edit(self, batch: dict, condition=None, diagnostics: bool = False):
        requests = self.requests(batch)
        weights = dict(self.weights)
        layer = self.layers[0]
        fan_in_fan_out = self.layout[layer.weight][0]
        us, vs = [], []
        for request in requests:
            u = self.left_vector(weights, request, layer)
            v = self.right_vector(weights, request, layer, u)
            us.append(u.detach())
            vs.append(v.detach())
            w = weights.get(layer.weight, self.model.get_parameter(layer.weight))
            weights[layer.weight] = apply_factors(w, u[None], v[None], fan_in_fan_out)
        factors = {layer.weight: (torch.stack(us), torch.stack(vs))}
        return self.edited_with(weights, factors, {"rome/requests": float(len(requests))})
