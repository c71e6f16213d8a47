"""A synthetic edit set for tests and benchmarks: random token prompts with a 1-token target.

It yields batches in the layout of the real data sets (``edit_inner`` / ``edit_outer`` / ``loc`` / ``cond``, see
``data_classes/gen.py``) without a tokenizer, a model or files, so a tiny model built from a config class can be
trained on it in seconds.
"""

from __future__ import annotations

import torch

from losses import IGNORE

VOCAB = 64  # token ids are drawn from 1 .. VOCAB - 1


class SyntheticEdits:
    """Random prompts with a 1-token target; the equivalence input drops the first prompt token.

    Mirrors the batch contract of the real data classes (edit_inner / edit_outer / loc / cond).
    """

    def __init__(self, n: int, n_edits: int = 1, prompt_len: int = 6, seed: int = 0, vocab: int = VOCAB):
        g = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(1, vocab, (n, prompt_len), generator=g)
        self.targets = torch.randint(1, vocab, (n, 1), generator=g)
        self.locs = torch.randint(1, vocab, (n, prompt_len + 1), generator=g)
        self.n_edits = n_edits
        self.seed = seed

    def __len__(self):
        return len(self.prompts)

    def _batch(self, idx, n_loc):
        ids = torch.cat([self.prompts[idx], self.targets[idx]], 1)
        labels = torch.full_like(ids, IGNORE)
        labels[:, -1] = ids[:, -1]
        outer_ids, outer_labels = ids[:, 1:], labels[:, 1:]
        loc_ids = self.locs[idx[:n_loc]] if n_loc <= len(idx) else self.locs[:n_loc]
        edit = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {
            "edit_inner": edit,
            "edit_outer": {
                "input_ids": outer_ids,
                "attention_mask": torch.ones_like(outer_ids),
                "labels": outer_labels,
            },
            "loc": {"input_ids": loc_ids, "attention_mask": torch.ones_like(loc_ids), "labels": loc_ids.clone()},
            "cond": edit,
        }

    def edit_generator(self, batch_size: int, n: int | None = None):
        n_loc = batch_size - self.n_edits
        if n is not None:
            for i in range(n):
                idx = torch.arange(i * self.n_edits, (i + 1) * self.n_edits) % len(self)
                yield self._batch(idx, n_loc)
            return
        g = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(len(self), generator=g)
            for i in range(0, len(self) - self.n_edits + 1, self.n_edits):
                yield self._batch(perm[i : i + self.n_edits], n_loc)
