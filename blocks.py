"""The stacks of transformer blocks: which block holds an edited weight, and reuse of the blocks below the edits.

Edits touch the top blocks of a frozen model, so the blocks below the lowest edited one compute the same thing in
every pass over the same inputs. A training step runs two such passes over its locality inputs: the unedited model
(for the KL's reference) and the edited one. :class:`LowerBlocks` records the outputs of the lower blocks in the
first and returns them in the second without running those blocks (``speed.reuse_lower_blocks``).

It stays out of the way wherever that would not be exact: when the edited weights span several stacks (a seq2seq
model edited in its encoder and decoder) or lie outside any stack, when a weight of a lower block is edited or
trained (ENN's ``train_base``), and when the second pass does not receive the recorded inputs. Those passes simply
run every block. tests/test_speed.py checks that logits, losses and gradients match the plain passes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

LOG = logging.getLogger("blocks")


def block_of(model: nn.Module, param_name: str) -> Optional[Tuple[str, int]]:
    """(name of the ModuleList holding the block, index) of the block that owns ``param_name``, or None."""
    parts = param_name.split(".")
    module = model
    for i, part in enumerate(parts[:-1]):
        child = module.get_submodule(part)
        if isinstance(module, nn.ModuleList):
            return ".".join(parts[:i]), int(part)
        module = child
    return None


def lowest_edited(model: nn.Module, inner_params: Iterable[str]) -> Dict[str, int]:
    """For each stack of blocks that holds edited weights, the index of its lowest edited block."""
    lowest: Dict[str, int] = {}
    for name in inner_params:
        found = block_of(model, name)
        if found is not None:
            stack, index = found
            lowest[stack] = min(index, lowest.get(stack, index))
    return lowest


def grad_blocks(model: nn.Module, inner_params: Iterable[str]) -> List[str]:
    """Names of the blocks that keep activations: in each stack of blocks, the lowest edited one and all above it."""
    names = []
    for stack, index in lowest_edited(model, inner_params).items():
        n_blocks = len(model.get_submodule(stack))
        names += [f"{stack}.{i}" for i in range(index, n_blocks)]
    return names


def _tensors(args: tuple, kwargs: dict) -> List[torch.Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


class LowerBlocks:
    """Record the outputs of the blocks below the lowest edited one during one pass; replay them in a later pass
    over the same inputs instead of running those blocks.

    ``with lower.record(): model(**inputs)`` then ``with lower.replay(weights): model(**inputs)``, where ``weights``
    are the names of the weights the second pass binds. A block called several times per pass replays its outputs
    in order. The recording is dropped by :meth:`clear` (and replaced by the next :meth:`record`).
    """

    def __init__(self, model: nn.Module, inner_params: Iterable[str]):
        self.model = model
        inner_params = list(inner_params)
        lowest = lowest_edited(model, inner_params)
        outside = [n for n in inner_params if block_of(model, n) is None]
        self.blocks: List[nn.Module] = []
        self._params: set = set()
        if len(lowest) == 1 and not outside:
            ((stack, index),) = lowest.items()
            self.blocks = [model.get_submodule(f"{stack}.{i}") for i in range(index)]
            self._params = {f"{stack}.{i}.{n}" for i in range(index) for n, _ in self.blocks[i].named_parameters()}
        self._outputs: Optional[List[list]] = None
        self._inputs: Optional[list] = None  # the tensors the first lower block received, per call

    def clear(self) -> None:
        self._outputs = self._inputs = None

    @contextlib.contextmanager
    def record(self):
        """Within the block, the lower blocks' outputs (and the first one's inputs) are kept."""
        self.clear()
        if not self.blocks:
            yield
            return
        outputs: List[list] = [[] for _ in self.blocks]
        inputs: list = []
        handles = []
        for i, block in enumerate(self.blocks):

            def hook(module, args, kwargs, output, _i=i):
                outputs[_i].append(output)
                if _i == 0:
                    inputs.append(_tensors(args, kwargs))

            handles.append(block.register_forward_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._outputs, self._inputs = outputs, inputs

    def usable(self, weights: Iterable[str]) -> bool:
        """The recording can stand in for the lower blocks of a pass that binds ``weights``."""
        if self._outputs is None:
            return False
        if self._params.intersection(weights):
            return False
        return not any(p.requires_grad for b in self.blocks for p in b.parameters())

    @contextlib.contextmanager
    def replay(self, weights: Iterable[str]):
        """Within the block, the lower blocks return their recorded outputs (when :meth:`usable`); the first one
        checks that it receives the recorded inputs, and otherwise every block runs as usual."""
        if not self.usable(weights):
            yield
            return
        outputs, inputs = self._outputs, self._inputs
        calls = [0] * len(self.blocks)
        state = {"on": True}
        saved = [block.__dict__.get("forward") for block in self.blocks]  # an instance's own forward (a wrapper)
        for i, block in enumerate(self.blocks):
            original = block.forward

            def forward(*args, _i=i, _original=original, **kwargs):
                n = calls[_i]
                calls[_i] += 1
                if _i == 0 and state["on"]:
                    given = _tensors(args, kwargs)
                    same = n < len(inputs) and len(given) == len(inputs[n])
                    state["on"] = same and all(
                        a.shape == b.shape and torch.equal(a, b) for a, b in zip(given, inputs[n])
                    )
                    if not state["on"]:
                        LOG.warning("The lower blocks see other inputs than recorded: running them.")
                if not state["on"] or n >= len(outputs[_i]):
                    return _original(*args, **kwargs)
                return outputs[_i][n]

            block.forward = forward
        try:
            yield
        finally:
            for block, own in zip(self.blocks, saved):
                if own is None:
                    del block.forward  # back to the class's forward
                else:
                    block.forward = own
