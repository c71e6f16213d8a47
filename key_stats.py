"""The key statistics of the locate-then-edit editors (ROME, MEMIT, AlphaEdit): the second moment C = E[k k^T] of
an edited layer's inputs k over the embedded text corpus, in the role Wikipedia plays in the original code.

C is computed once per (model, layer, sample count) with a progress bar and cached on disk as safetensors under
``<cache_dir>/key_stats/``: the passages of the embedded corpus (:mod:`data_classes.corpus`, CIA World Factbook
backgrounds cut into sentence-aligned passages of at most ``MAX_TOKENS`` tokens), the first ``n_samples`` of them in
a fixed order, each run through the unedited model; every non-padding token's input to the layer adds k k^T, and C
is the sum over the number of tokens, accumulated in float64 and returned in float32 (the original's ``layer_stats``
collects the same uncentred ``mom2`` over up to 100,000 Wikipedia texts).

Editors get a :class:`SecondMoments` bound to their base model through ``EditableModel.attach_text`` and ask it
for a layer by module name; they never read the corpus themselves.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from data_classes.corpus import corpus_version, factbook_documents, split_passages
from progress import progress_bar

LOG = logging.getLogger(__name__)

MAX_TOKENS = 128  # passage length (the original truncates its Wikipedia texts to the model's context)
BATCH = 8  # passages per forward pass


def corpus_passages(tokenizer, max_tokens: int = MAX_TOKENS) -> List[str]:
    """Every passage of the embedded corpus, documents in id order, passages in text order."""
    return [p for _, text in factbook_documents() for p in split_passages(text, tokenizer, max_tokens)]


class SecondMoments:
    """``moments(module_name, n_samples)``: the (d_in, d_in) float32 second moment of the inputs of ``module_name``
    (an nn.Linear or Conv1D of ``model``) over the first ``n_samples`` corpus passages, from the disk cache when it
    holds it. The base model is run as it is (never edited weights); results are also kept in memory."""

    def __init__(self, model: torch.nn.Module, tokenizer, cache_dir: str, model_id: str, show_progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.dir = Path(os.path.expanduser(cache_dir)) / "key_stats" / _safe(model_id)
        self.show_progress = show_progress
        self._memory: Dict[Tuple[str, int], torch.Tensor] = {}
        self._passages: Optional[List[str]] = None
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or MAX_TOKENS
        self.max_tokens = min(MAX_TOKENS, int(context))  # a passage's tokens beyond the model's context are cut

    def path(self, module_name: str, n_samples: int) -> Path:
        return self.dir / f"{_safe(module_name)}-n{n_samples}-t{self.max_tokens}-{_safe(corpus_version())}.safetensors"

    def __call__(self, module_name: str, n_samples: int) -> torch.Tensor:
        self.prefetch([module_name], n_samples)
        return self._memory[(module_name, int(n_samples))]

    def prefetch(self, module_names: Sequence[str], n_samples: int) -> None:
        """Load or compute the statistics of every module of ``module_names``; those not cached on disk are computed
        together, in one pass over the corpus that stops at the deepest of them."""
        n_samples = int(n_samples)
        missing = []
        for name in dict.fromkeys(module_names):
            if (name, n_samples) in self._memory:
                continue
            path = self.path(name, n_samples)
            if path.exists():
                self._memory[(name, n_samples)] = load_file(str(path))["mom2"]
            else:
                missing.append(name)
        if not missing:
            return
        for name, moment in zip(missing, self.compute(missing, n_samples)):
            path = self.path(name, n_samples)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"mom2": moment.contiguous()}, str(tmp))
            os.replace(tmp, path)
            LOG.info("Wrote the key statistics of %s to %s", name, path)
            self._memory[(name, n_samples)] = moment

    @torch.no_grad()
    def compute(self, module_names: Sequence[str], n_samples: int) -> List[torch.Tensor]:
        """The second moments of ``module_names``' inputs, in their order, from one pass per batch of passages."""
        if self._passages is None:
            self._passages = corpus_passages(self.tokenizer)
        texts = self._passages[:n_samples]
        if len(texts) < n_samples:
            LOG.warning("The embedded corpus has %d passages; the key statistics use all of them.", len(texts))
        device = next(self.model.parameters()).device
        totals: Dict[str, torch.Tensor] = {}  # sum of k k^T (float64) per module, set at the first batch
        count = dict.fromkeys(module_names, 0)
        mask_now: List[torch.Tensor] = []
        seen: set = set()

        def hook_for(name: str):
            def hook(_module, inputs, _output):
                k = inputs[0][mask_now[0]].double()  # (tokens, d_in), padding removed
                if name not in totals:
                    totals[name] = torch.zeros(k.shape[-1], k.shape[-1], dtype=torch.float64, device=k.device)
                totals[name].addmm_(k.T, k)
                count[name] += k.shape[0]
                seen.add(name)
                if len(seen) == len(count):
                    raise _Reached  # the layers above and the output head are not needed

            return hook

        label = module_names[0] if len(module_names) == 1 else f"{len(module_names)} layers"
        progress = progress_bar(f"key statistics of {label}", unit="text") if self.show_progress else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        handles = [self.model.get_submodule(n).register_forward_hook(hook_for(n)) for n in count]
        try:
            for start in range(0, len(texts), BATCH):
                rows = [self.tokenizer(t)["input_ids"][: self.max_tokens] for t in texts[start : start + BATCH]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([r + [pad or 0] * (width - len(r)) for r in rows], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
                mask_now[:] = [mask.bool()]
                seen.clear()
                try:
                    self.model(input_ids=ids, attention_mask=mask)
                except _Reached:
                    pass
                if progress:
                    progress(min(start + BATCH, len(texts)), len(texts))
        finally:
            for handle in handles:
                handle.remove()
        empty = [n for n, c in count.items() if not c]
        if empty:
            raise ValueError(f"no corpus tokens reached {empty[0]}: the key statistics are empty.")
        return [(totals[n] / count[n]).float().cpu() for n in module_names]


class _Reached(Exception):
    """Raised by the hook once the layer's inputs are recorded: the rest of the forward pass is skipped."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "model"
