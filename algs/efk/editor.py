"""KnowledgeEditor (EFK; De Cao et al., "Editing Factual Knowledge in Language Models", 2021).

A bidirectional LSTM reads the condition text (``"<prediction> >> <new target> || <input>"``, or the edit
input itself for ``gen``) through a trainable copy of the base model's input embeddings and produces a
condition vector c. For each edited weight W (shape d0 x d1), a weight-normalised MLP maps c to two row
vectors, two column vectors and a scale s; with A = softmax(row_a)^T col_a and B = softmax(row_b)^T col_b
(outer products, d0 x d1) the edited weight is

    W~ = W + max_scale * sigmoid(s) * (grad_W * A + B),

where grad_W is the gradient of the edit loss at W. The editor is trained with MEND's objective
(c_edit * L_e + c_loc * L_loc); the gradient grad_W is treated as a constant (first order).

Several edits in one batch: the condition vector, and so A, B and s, is computed per edit and the updates
are summed, each scaling the gradient of the batch's mean edit loss. With one edit this is the original.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from editable_model import EditableModel


def input_embedding_weight(model: nn.Module, config) -> torch.Tensor:
    """The base model's input embedding matrix, from the module named by ``model.embedding_module``."""
    name = config.model.embedding_module
    if name is None:
        # Every transformers model exposes its input embeddings; the config names the module when it is known.
        return model.get_input_embeddings().weight
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(
            f"model.embedding_module={name!r} is not a module of {type(model).__name__}; set it to the name of the "
            f"input embedding (e.g. transformer.wte for GPT-2, model.embed_tokens for Llama) or to null."
        ) from e
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() != 2:
        raise ValueError(f"model.embedding_module={name!r} has no 2-D weight; name the input embedding module.")
    return module.weight


class ConditionEncoder(nn.Module):
    """Token ids -> condition vector: embeddings, a bidirectional LSTM, both final states, a tanh projection."""

    def __init__(self, embedding: torch.Tensor, lstm_hidden: int, condition_dim: int):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(embedding.detach().float().clone(), freeze=False)
        self.lstm = nn.LSTM(embedding.shape[1], lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * lstm_hidden, condition_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()
        # Valid tokens first in each row (whichever side the batch was padded on), then pack by length.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        ids = input_ids.gather(1, order)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (2, B, H), the last state of each direction
        return torch.tanh(self.proj(torch.cat([h[0], h[1]], dim=-1)))


class WeightConditioner(nn.Module):
    """c -> (A, B, s) for one weight of shape (d0, d1), through a weight-normalised tanh MLP."""

    def __init__(self, shape: torch.Size, condition_dim: int, hidden_dim: int, max_scale: float):
        super().__init__()
        self.d0, self.d1 = int(shape[0]), int(shape[1])
        self.max_scale = max_scale
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden_dim)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden_dim, 2 * (self.d0 + self.d1) + 1)),
        )

    def forward(self, condition: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The update for this weight: sum over the rows of ``condition`` (one per edit)."""
        col_a, row_a, col_b, row_b, s = self.net(condition).split([self.d1, self.d0, self.d1, self.d0, 1], dim=-1)
        a = row_a.softmax(-1).unsqueeze(-1) * col_a.unsqueeze(-2)  # (n, d0, d1)
        b = row_b.softmax(-1).unsqueeze(-1) * col_b.unsqueeze(-2)
        scale = self.max_scale * torch.sigmoid(s).unsqueeze(-1)  # (n, 1, 1)
        return (scale * (grad.unsqueeze(0) * a + b)).sum(0)


class EFK(EditableModel):
    def __init__(self, model: nn.Module, config, weights=None, editor: Optional[nn.Module] = None):
        super().__init__(model, config, weights)
        if editor is None:
            cfg = config.efk
            embedding = input_embedding_weight(model, config)
            conditioners = nn.ModuleDict()
            for name in self.inner_params:
                shape = model.get_parameter(name).shape
                if len(shape) != 2:
                    raise ValueError(
                        f"model.inner_params entry {name!r} has shape {tuple(shape)}; EFK edits 2-D weights."
                    )
                conditioners[name.replace(".", "#")] = WeightConditioner(
                    shape, cfg.condition_dim, cfg.hidden_dim, cfg.max_scale
                )
            editor = nn.ModuleDict(
                {
                    "condition": ConditionEncoder(embedding, cfg.lstm_hidden, cfg.condition_dim),
                    "weights": conditioners,
                }
            )
        self.editor = editor

    def with_weights(self, weights: Dict[str, torch.Tensor]) -> EFK:
        edited = EFK(self.model, self.config, weights=weights, editor=self.editor)
        edited.train(self.training)
        return edited

    def outer_parameters(self) -> List[nn.Parameter]:
        return list(self.editor.parameters())

    def outer_lr(self) -> float:
        return float(self.config.efk.lr)

    def edit(self, batch: dict, condition: Optional[dict] = None, diagnostics: bool = False):
        names = self.inner_params
        with torch.enable_grad():
            leaves = {n: self.current_weight(n).detach().requires_grad_(True) for n in names}
            loss = self.loss_with(batch, leaves)["nll"]
            grads = torch.autograd.grad(loss, [leaves[n] for n in names])

        cond = condition if condition is not None else batch
        c = self.editor["condition"](cond["input_ids"], cond["attention_mask"])  # (n_edits, condition_dim)
        new_weights: Dict[str, torch.Tensor] = dict(self.weights)
        info = {"loss/edit_inner": loss.item()}
        for i, name in enumerate(names):
            update = self.editor["weights"][name.replace(".", "#")](c, grads[i].float())
            w = self.current_weight(name)
            new_weights[name] = w + update.to(w.dtype)
            with torch.no_grad():
                info[f"grad/cos{i}"] = F.cosine_similarity(
                    grads[i].reshape(-1).float(), -update.detach().reshape(-1), dim=0
                ).item()
        return self.with_weights(new_weights), info
