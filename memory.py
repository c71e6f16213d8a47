"""Memory of editor training: activation checkpointing, and an estimate per device.

Only the blocks from the lowest edited one upward keep activations for the backward pass (``blocks.grad_blocks``):
the base model is frozen, so nothing below the first edited weight requires a gradient and autograd saves nothing
there (the original needed a fork of transformers for this; here it follows from editing through
``functional_call`` with frozen weights, and tests/test_memory.py checks it). ``activation_checkpointing=True`` also
drops the activations inside those blocks and recomputes them in the backward pass.
"""

from __future__ import annotations

import contextlib
import logging
from typing import List

import torch
import torch.nn as nn
import transformers
from torch.nn.utils.stateless import _reparametrize_module
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action
from torch.utils.checkpoint import checkpoint

from algs import editor_class
from blocks import grad_blocks

LOG = logging.getLogger("memory")


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, block_names: List[str]):
    """Within the block, the named blocks keep only their inputs and recompute the rest in the backward pass.

    Edited weights are bound through ``functional_call``, whose binding ends before the backward pass, so each
    block's current weights are passed to the checkpoint as explicit inputs and bound again for the recomputation.
    The blocks are restored on exit (the backward pass may run later: it does not need the patch).
    """
    if not block_names:
        yield
        return
    patched = []
    for name in block_names:
        block = model.get_submodule(name)
        names = [n for n, _ in block.named_parameters()] + [n for n, _ in block.named_buffers()]
        original = block.forward

        def forward(*args, _block=block, _names=names, _original=original, **kwargs):
            def run(*tensors):
                with _reparametrize_module(_block, dict(zip(_names, tensors))):
                    return _original(*args, **kwargs)

            current = [getattr(_block.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in _names]
            return checkpoint(run, *current, use_reentrant=False)

        block.forward = forward
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- the estimate ---------------------------------------------------------------------------------------------

# Values autograd keeps per token and per block, as multiples of the hidden size d, the key/value width kv and the
# MLP width f, for a pre-norm decoder block with a gated MLP (Llama, Qwen2, Mistral, Gemma-2): 5 d (the two norms'
# inputs, q, the attention output and the o_proj input), 2 kv (k and v after rotary), 3 f (gate, up, act(gate)).
# Fitted exactly (within 1%) to torch.autograd.graph.saved_tensors_hooks counts on tiny Llamas of three shapes;
# tests/test_memory.py checks the whole estimate against a measured peak.
_BLOCK_D, _BLOCK_KV, _BLOCK_F = 5, 2, 3


def _sizes(model: nn.Module) -> dict:
    c = getattr(model, "config", None)
    d = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None) or getattr(c, "d_model", 0)
    f = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "d_ff", None) or 4 * d
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None) or 1
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or d // heads
    vocab = getattr(c, "vocab_size", 0)
    return {"d": d, "f": f, "kv": kv_heads * head_dim, "heads": heads, "vocab": vocab}


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def meta_model(model_cfg) -> nn.Module:
    """The model of ``model_cfg`` on the meta device, from ``model.arch`` (no download, no memory)."""
    if not model_cfg.arch:
        raise ValueError(
            f"model.arch is not set for {model_cfg.name!r}: the estimate without the model needs its config.json "
            f"sizes (model_type, hidden_size, ...) under model.arch in the model's YAML."
        )
    arch = dict(model_cfg.arch)
    config = transformers.AutoConfig.for_model(arch.pop("model_type"), **arch)
    with torch.device("meta"):
        return getattr(transformers, model_cfg.class_name)._from_config(config, dtype=getattr(torch, model_cfg.dtype))


def estimate(cfg, model: nn.Module | None = None, world_size: int = 1, seq_len: int | None = None) -> dict:
    """Bytes per device of a training step of ``cfg`` (an ordered dict of parts, plus "total").

    ``model``: the loaded base model (default: built on the meta device from ``model.arch``). ``seq_len``: tokens
    per sequence (default: data.max_passage_tokens + data.n_tokens, the gen experiment's longest input).
    """
    model = model if model is not None else meta_model(cfg.model)
    dtype = next(model.parameters()).dtype
    b = dtype_bytes(dtype)
    with torch.device("meta"):
        editor = editor_class(cfg.alg)(model, cfg)
    n_editor = sum(p.numel() for p in editor.parameters())
    s = _sizes(model)
    T = seq_len or cfg.data.max_passage_tokens + cfg.data.n_tokens
    n_edit_tokens = cfg.data.n_edits * T
    n_loc_tokens = (cfg.batch_size - cfg.data.n_edits) * T
    n_blocks = len(grad_blocks(model, cfg.model.inner_params))
    inner = [model.get_parameter(n) for n in cfg.model.inner_params]
    numels = [p.numel() for p in inner]

    parts = {}
    parts["base model weights"] = _unique_bytes(list(model.parameters()) + list(model.buffers()))
    parts["editor"] = 4 * n_editor + _unique_bytes(list(editor.buffers()))
    parts["editor gradients"] = 4 * n_editor
    parts["optimizer state (Adam)"] = 8 * n_editor
    if world_size > 1:
        parts["DDP gradient buckets"] = 4 * n_editor
    # the update of each edited weight: the fp32 pseudo-gradient kept for the backward pass, the edited weight, the
    # true gradient (kept for grad/cos), and one fp32 temporary at a time
    parts["edited weights"] = sum(numels) * (4 + 2 * b) + 4 * max(numels)
    parts["editor activations"] = editor.activation_bytes(n_edit_tokens)
    # the blocks that keep activations (the lowest edited one and above) for the post-edit passes (equivalence
    # and locality inputs); with checkpointing only each block's input
    tokens = n_edit_tokens + n_loc_tokens
    per_block = b * (_BLOCK_D * s["d"] + _BLOCK_KV * s["kv"] + _BLOCK_F * s["f"])
    if cfg.activation_checkpointing:
        per_block = b * s["d"]
    parts["block activations"] = tokens * n_blocks * per_block
    # logits over the vocabulary: the model's output, its float32 copy and log-softmax (edit loss); for the
    # locality KL also the unedited logits, their log-softmax, its exp and the log-ratio
    v = s["vocab"]
    fp32_copy = 0 if b == 4 else 4
    parts["logits"] = n_edit_tokens * v * (b + fp32_copy + 4) + n_loc_tokens * v * (b + fp32_copy + 4 + 4 * 4)
    parts["total"] = sum(parts.values())
    return parts


def format_estimate(parts: dict) -> str:
    width = max(len(k) for k in parts) + 2
    return "\n".join(f"  {k.ljust(width)}{v / 2**30:9.2f} GiB" for k, v in parts.items())


def log_estimate(cfg, model: nn.Module, world_size: int) -> None:
    try:
        parts = estimate(cfg, model, world_size)
    except Exception as e:  # an estimate must never stop a run
        LOG.warning("No memory estimate for this model (%s: %s).", type(e).__name__, e)
        return
    LOG.info(
        "Estimated memory per device for a training step (batch_size=%d, %s, %d process(es)):\n%s",
        cfg.batch_size,
        str(next(model.parameters()).dtype).replace("torch.", ""),
        world_size,
        format_estimate(parts),
    )


def measure_peak(fn) -> int:
    """Peak bytes of the tensors ``fn()`` allocates on the CPU (beyond those alive before), from the profiler's memory
    timeline (torch.profiler with profile_memory: every allocation and free of a tensor storage, in order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    created = set()
    for _, action, key, size in sorted(prof._memory_profile().timeline, key=lambda e: e[0]):
        if action == Action.CREATE:
            created.add(key)
            live += size
        elif action == Action.DESTROY and key in created:
            live -= size
        peak = max(peak, live)
    return peak
