"""Running only the blocks an edit can change.

An editor changes the weights named in ``model.inner_params``. When they all sit in blocks of one ``nn.ModuleList``
(a transformer's layers) and the first of them is block k, everything a forward pass computes before block k is
the same on the unedited and on every edited model. Scoring the same rows on many edited models (the many-edits
evaluation) can therefore compute the output of block k-1 once, on the unedited model, and on the edited models
run only blocks k and up: on SmolLM2 with its last 3 of 30 blocks edited, a tenth of the work per token.

:func:`first_edited_block` finds block k; :func:`capture_block_output` records the output of block k-1 during a
normal forward pass; :func:`replaying` makes blocks 0..k-1 return a given output instead of computing (every one of
them returns it: the model's loop hands it from block to block and block k receives it). Whether a model's blocks
can be replayed is a property of its forward code, so the caller checks the replayed logits against a full forward
pass once (:class:`scoring.RowScorer` does) and falls back to full passes where they differ.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn


def first_edited_block(model: nn.Module, names: Sequence[str]) -> Optional[Tuple[nn.ModuleList, int]]:
    """(the ModuleList of blocks, k) where k > 0 is the first block holding one of the weights ``names``; None when a
    weight is outside such a list, the weights span two lists, or k is 0 (nothing before it to save)."""
    modules = dict(model.named_modules())
    found: Optional[Tuple[str, int]] = None
    for name in names:
        parts = name.split(".")
        here = None
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and isinstance(modules.get(".".join(parts[:i])), nn.ModuleList):
                here = (".".join(parts[:i]), int(part))
                break
        if here is None or (found is not None and here[0] != found[0]):
            return None
        if found is None or here[1] < found[1]:
            found = here
    if found is None or found[1] == 0:
        return None
    return modules[found[0]], found[1]


def _hidden_of(output) -> Optional[torch.Tensor]:
    """The hidden states of a block's output: the tensor itself, or the first item of a tuple whose other items are
    None (no cache, no attention weights); None for any other layout."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if all(item is None for item in output[1:]):
            return output[0]
    return None


@contextmanager
def capture_block_output(blocks: nn.ModuleList, k: int) -> Iterator[List[Optional[Tuple[torch.Tensor, bool]]]]:
    """Record the hidden states block k-1 outputs (detached) and whether it returned them in a tuple, one entry per
    forward pass; an entry is None where the output has a layout :func:`replaying` cannot rebuild. The hook is
    removed on exit."""
    records: List[Optional[Tuple[torch.Tensor, bool]]] = []

    def hook(module, inputs, output):
        hidden = _hidden_of(output)
        records.append(None if hidden is None else (hidden.detach(), isinstance(output, tuple)))

    handle = blocks[k - 1].register_forward_hook(hook)
    try:
        yield records
    finally:
        handle.remove()


@contextmanager
def replaying(blocks: nn.ModuleList, k: int, hidden: Callable[[], torch.Tensor], as_tuple: bool) -> Iterator[None]:
    """Within the block, blocks 0..k-1 compute nothing: each returns ``hidden()`` (a tuple of it with ``as_tuple``,
    as the model's blocks return). Their own forward methods are put back on exit, whatever happens inside."""
    saved = [blocks[i].__dict__.get("forward") for i in range(k)]

    def replay(*args, **kwargs):
        h = hidden()
        return (h,) if as_tuple else h

    try:
        for i in range(k):
            blocks[i].forward = replay
        yield
    finally:
        for i, old in enumerate(saved):
            if old is None:
                blocks[i].__dict__.pop("forward", None)
            else:
                blocks[i].forward = old


@contextmanager
def output_layer_at(model: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
    """Within the block, the model's output layer (``get_output_embeddings()``) runs on the positions (rows[i],
    cols[i]) of its input alone, as one (1, len(rows), d) batch: the logits the model returns are those positions'
    logits in that order, (1, len(rows), vocab). Yields False (and changes nothing) for a model without an output
    layer module. Computing the output layer on a few positions is most of the saving of a replayed pass: on SmolLM2
    it costs as much per position as 8 of its 30 blocks."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        yield False
        return

    def pick(module, args):
        hidden = args[0]
        return (hidden[rows, cols].unsqueeze(0),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield True
    finally:
        handle.remove()
