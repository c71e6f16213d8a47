"""The classifier of ``kind: classifier`` models (the ``fc`` experiment): an encoder and one logit."""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger("models")  # one logger for the package: its log lines name "models", whichever file writes


class BertClassifier(torch.nn.Module):
    """A binary classifier: an encoder (``BertModel``) and one logit from its pooled output, as in the original.

    Parameter names are ``model.<encoder weight>`` and ``classifier.weight`` / ``classifier.bias``, the names of
    the original's ``BertClassifier`` state dicts (its ``model.pt``); ``model.inner_params`` use them too. The
    forward pass takes the encoder's inputs (``labels`` is ignored) and returns the logits, shape (batch, 1).
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.model = encoder
        hidden = int(encoder.config.hidden_size)
        generator = torch.Generator().manual_seed(0)  # the same head whatever the global RNG state
        self.classifier = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.classifier.weight.uniform_(-bound, bound, generator=generator)
            self.classifier.bias.zero_()

    @property
    def config(self):
        return self.model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        out = self.model(*args, **kwargs)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0][:, 0]
        return self.classifier(pooled)


def as_classifier(encoder: torch.nn.Module) -> BertClassifier:
    """Wrap an encoder loaded for a ``kind: classifier`` config."""
    if getattr(encoder, "pooler", "absent") is None:
        LOG.warning("%s has no pooler: the classifier reads the first token's hidden state.", type(encoder).__name__)
    return BertClassifier(encoder)
