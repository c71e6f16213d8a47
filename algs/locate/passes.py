"""The forward passes of the target vectors' optimisation (:func:`vectors.optimise_targets`).

Every step runs the same prompts again with a new delta added at the subject's last token of a module's output,
and reads the logits at a few positions. Most of what such a pass computes is the same at every step:

* the blocks below the one the delta is written in: after the first pass they replay its output
  (``models/replay.py``);
* every position before the subject's last token, in every block: in a causal model the delta cannot reach them.
  They run once (the prefix), their keys and values are kept, and each step runs only the tokens from the subject's
  last on (the suffix) on a copy of that cache, at their own positions (position ids) with the prefix's padding
  masked. On the CounterFact prompts of SmolLM2 the suffix is 38% of the tokens.

Both give the numbers of the full passes to float rounding. The first step runs the full pass (its loss, the initial
vectors) and the suffix pass beside it, and keeps to full passes where the two differ (a model whose forward takes
no position ids or cache, or computes something else with them); ``prefix=False`` never tries.
"""

from __future__ import annotations

import copy
import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from editable_model import cache_argument, forward_takes, logits_of, output_with_weights
from models.replay import capture_block_output, first_edited_block, output_layer_at, replaying

from .text import encode_batch, pad_id, subject_last_index, target_ids

LOG = logging.getLogger(__name__)


@contextmanager
def hooked(model: torch.nn.Module, module_name: str, hook: Callable) -> Iterator[None]:
    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hidden_of(output) -> torch.Tensor:
    """A module's output as a tensor (older transformers' blocks return a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


@dataclass
class Rows:
    """The prompt rows of the requests optimised together, encoded once (right-padded): request r owns rows
    ``of(r)`` (its rewriting prompts, then its "<subject> is a"), ``lookup[i]`` is the subject's last token of row
    i, ``length[i]`` its length without padding, ``targets[r]`` request r's target token ids."""

    ids: torch.Tensor
    mask: torch.Tensor
    lookup: List[int]
    length: List[int]
    targets: List[List[int]]
    n_rows: int  # rows per request: the rewriting prompts and the KL prompt
    pad: int

    def of(self, r: int) -> range:
        return range(r * self.n_rows, (r + 1) * self.n_rows)

    @classmethod
    def encode(cls, tokenizer, requests, contexts: Sequence[str], device) -> Rows:
        """Each request's prompts as the originals build them: each context template with the prompt and the target
        but its last token (the rewriting prompts), then "<subject> is a" (the KL prompt)."""
        texts, lookup, targets = [], [], []
        for request in requests:
            tgt = target_ids(tokenizer, request.target)
            prompts = [c.format(request.prompt) + tokenizer.decode(tgt[:-1]) for c in contexts] + ["{} is a"]
            texts += [p.format(request.subject) for p in prompts]
            lookup += [subject_last_index(tokenizer, p, request.subject) for p in prompts]
            targets.append(tgt)
        ids, mask = encode_batch(tokenizer, texts, device)
        return cls(ids, mask, lookup, mask.sum(1).tolist(), targets, len(contexts) + 1, pad_id(tokenizer))


class TargetPasses:
    """The passes of one optimisation: :meth:`logits` gives, for the requests ``active``, the logits the loss reads
    with the delta of each added at its subject's last token, and where each request's logits are."""

    def __init__(self, model, weights, rows: Rows, module: str, n_requests: int, prefix: bool = True):
        self.model, self.weights, self.rows, self.module = model, weights, rows, module
        self.device = rows.ids.device
        self.located = first_edited_block(model, [module + ".weight"])
        self.lower: Dict[str, Optional[Tuple[torch.Tensor, bool]]] = {}  # "full" / "suffix" -> block k-1's output
        self.init = torch.zeros(n_requests, model.config.hidden_size, device=self.device)  # v_init per request
        self.prefix = (
            prefix
            and forward_takes(model, "position_ids")
            and forward_takes(model, "use_cache")
            and max(rows.lookup) > 0
        )
        self.cache = None  # the prefix's keys and values once they matched the full pass
        self.prefix_mask: Optional[torch.Tensor] = None

    # -- what the loss reads ----------------------------------------------------------------------------------------
    def picked(self, active: List[int]) -> Tuple[List[int], List[int], Dict[int, Tuple[int, int]]]:
        """(rows, columns, spans): per request of ``active`` its rewriting rows at the positions that predict the
        target's tokens (the last len(target) of each row), then its KL row at the subject's last token, in full-row
        coordinates (rows: the index within ``active``'s rows); spans: request -> (where its logits start, its
        number of target tokens)."""
        rows, cols, spans = [], [], {}
        n = self.rows.n_rows
        for k, r in enumerate(active):
            n_tgt = len(self.rows.targets[r])
            spans[r] = (len(rows), n_tgt)
            for j, i in enumerate(self.rows.of(r)):
                if j < n - 1:
                    rows += [k * n + j] * n_tgt
                    cols += [self.rows.length[i] - n_tgt + t for t in range(n_tgt)]
            rows.append((k + 1) * n - 1)
            cols.append(self.rows.lookup[self.rows.of(r)[-1]])
        return rows, cols, spans

    def logits(self, active: List[int], delta: torch.Tensor, first: bool):
        """(the logits the loss reads, spans). ``first``: the first step (all requests), which also takes each
        request's initial vector and decides between suffix and full passes."""
        if first:
            out = self.full(active, delta, first=True)
            if self.prefix:
                self.run_prefix()
            if self.cache is not None:  # the model returned one
                with torch.no_grad():
                    check = self.suffix(active, delta)
                if check.shape != out[0].shape or not torch.allclose(check, out[0].detach(), 1e-3, 1e-3):
                    LOG.info("%s: passes on a prefix cache differ; full passes", type(self.model).__name__)
                    self.cache = None
            return out
        if self.cache is not None:
            return self.suffix(active, delta), self.picked(active)[2]
        return self.full(active, delta, first=False)

    # -- the passes ---------------------------------------------------------------------------------------------------
    def full(self, active: List[int], delta: torch.Tensor, first: bool):
        sel = [i for r in active for i in self.rows.of(r)]
        width = max(self.rows.length[i] for i in sel)
        sel_t = torch.tensor(sel, device=self.device)
        kwargs = {"input_ids": self.rows.ids[sel_t, :width], "attention_mask": self.rows.mask[sel_t, :width]}
        at = torch.tensor([self.rows.lookup[i] for i in sel], device=self.device)
        rows, cols, spans = self.picked(active)
        return self.run(kwargs, active, sel_t, at, delta, rows, cols, "full", width, first), spans

    def run_prefix(self) -> None:
        """The positions before each row's subject's last token, once, through the whole model: their keys and
        values (the cache) and the mask of the prefix's padding. A row with nothing before it attends to one pad
        token here (so that no row is masked whole), masked in the steps' passes."""
        split = self.rows.lookup
        width = max(split)
        ids = torch.full((len(split), width), self.rows.pad, device=self.device, dtype=self.rows.ids.dtype)
        mask = torch.zeros(len(split), width, device=self.device, dtype=self.rows.mask.dtype)
        for i, s in enumerate(split):
            ids[i, :s], mask[i, :s] = self.rows.ids[i, :s], 1
        here = mask.clone()
        here[:, 0] = 1
        name = cache_argument(self.model)
        first = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.no_grad(), output_layer_at(self.model, first, first):
            out = output_with_weights(
                self.model, self.weights, {"input_ids": ids, "attention_mask": here, "use_cache": True}
            )
        self.cache, self.prefix_mask = getattr(out, name, None), mask
        if self.cache is None:
            self.prefix = False

    def suffix(self, active: List[int], delta: torch.Tensor) -> torch.Tensor:
        """The pass over the tokens from each row's subject's last token on, on a copy of the prefix's cache."""
        sel = [i for r in active for i in self.rows.of(r)]
        split = [self.rows.lookup[i] for i in sel]
        width = max(self.rows.length[i] - s for i, s in zip(sel, split))
        ids = torch.full((len(sel), width), self.rows.pad, device=self.device, dtype=self.rows.ids.dtype)
        mask = torch.zeros(len(sel), width, device=self.device, dtype=self.rows.mask.dtype)
        for k, (i, s) in enumerate(zip(sel, split)):
            n = self.rows.length[i] - s
            ids[k, :n], mask[k, :n] = self.rows.ids[i, s : s + n], 1
        sel_t = torch.tensor(sel, device=self.device)
        start = torch.tensor(split, device=self.device)
        cache = copy.deepcopy(self.cache)
        if len(sel) != len(self.rows.lookup):
            cache.reorder_cache(sel_t)
        kwargs = {
            "input_ids": ids,
            "attention_mask": torch.cat([self.prefix_mask[sel_t], mask], 1),
            "position_ids": start[:, None] + torch.arange(width, device=self.device)[None],
            "use_cache": True,
            cache_argument(self.model): cache,
        }
        rows, cols, _ = self.picked(active)
        cols = [c - split[r] for r, c in zip(rows, cols)]
        at = torch.zeros(len(sel), dtype=torch.long, device=self.device)
        return self.run(kwargs, active, sel_t, at, delta, rows, cols, "suffix", width, first=False)

    def run(self, kwargs, active, sel_t, at, delta, rows, cols, mode: str, width: int, first: bool) -> torch.Tensor:
        """One pass with each request's delta added at ``at`` of its rows in the module's output: the logits at
        (rows, cols). The blocks below the module replay the output the first pass of this ``mode`` recorded."""
        n = self.rows.n_rows
        active_t = torch.tensor(active, device=self.device)
        owner = torch.arange(len(active), device=self.device).repeat_interleave(n)
        active_delta = delta[active_t]
        every = torch.arange(len(owner), device=self.device)

        def add_delta(_module, _inputs, output):
            hidden = hidden_of(output)
            if first:  # v_init: the clean output at each request's first prompt's subject token
                starts = torch.arange(len(active), device=self.device) * n
                self.init[active_t] = hidden[starts, at[starts]].detach()
            hidden = hidden.clone()
            hidden[every, at, :] = hidden[every, at, :] + active_delta[owner]
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        rows_t = torch.tensor(rows, device=self.device)
        cols_t = torch.tensor(cols, device=self.device)
        records = None
        with ExitStack() as stack:
            stack.enter_context(hooked(self.model, self.module, add_delta))
            cut = stack.enter_context(output_layer_at(self.model, rows_t, cols_t))
            if self.located is not None:
                if mode not in self.lower:
                    records = stack.enter_context(capture_block_output(*self.located))
                elif self.lower[mode] is not None:
                    lower, as_tuple = self.lower[mode]
                    part = lower[sel_t, :width]
                    stack.enter_context(replaying(*self.located, lambda: part, as_tuple))
            out = output_with_weights(self.model, self.weights, kwargs)
        if records is not None:
            self.lower[mode] = records[0] if len(records) == 1 else None
        logits = logits_of(out)
        return logits[0] if cut else logits[rows_t, cols_t]
