"""Large models: the memory estimate against a measured peak, activation checkpointing, frozen lower blocks, and the
model configs of current decoders (tiny random versions built from their config classes, no download)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from conftest import SyntheticEdits, freeze, make_config
from omegaconf import OmegaConf
from torch.func import functional_call

import blocks
import memory
from algs.mend.editor import MEND
from config_schema import ModelConfig
from models import check_inner_params
from trainer import EditTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 32  # tokens per sequence of the measured step
INNER = [f"model.layers.{i}.mlp.{w}.weight" for i in (1, 2, 3) for w in ("gate_proj", "up_proj", "down_proj")]


def tiny_gqa_llama(n_layer=4, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return freeze(transformers.LlamaForCausalLM(cfg)).to(dtype)


def batch_trainer(tmp_path, dtype="float32", **overrides):
    """A trainer at batch 10 (5 edits, 5 locality passages) of 32-token sequences, editing the last 3 blocks' MLPs."""
    model = tiny_gqa_llama(dtype=getattr(torch, dtype))
    cfg = make_config(
        "llama",
        **{"model.inner_params": INNER, "data.n_edits": 5, "batch_size": 10, "accumulate_bs": 1},
        **{"mend.rank": 1920, "model.dtype": dtype, **overrides},
    )
    data = SyntheticEdits(40, n_edits=5, prompt_len=T - 1)
    return EditTrainer(lambda: MEND(model, cfg), cfg, data, data, str(tmp_path)), model, cfg


def steady_state_peak(trainer, model) -> int:
    """Bytes alive at the peak of a training step once the normalisation statistics and Adam state exist."""
    gen = trainer._train_batches()
    trainer.edit_step(next(gen), training=True)
    trainer._optimizer_step()
    batch = next(gen)
    adam = [t for o in (trainer.opt, trainer.lr_opt) for st in o.state.values() for t in st.values()]
    alive = list(model.parameters()) + list(model.buffers()) + list(trainer.editor.parameters())
    alive += list(trainer.editor.buffers()) + [t for t in adam if torch.is_tensor(t)]

    def step():
        trainer.edit_step(batch, training=True)
        trainer._optimizer_step()

    return memory._unique_bytes(alive) + memory.measure_peak(step)


@pytest.mark.parametrize("dtype, checkpointing", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, dtype, checkpointing):
    trainer, model, cfg = batch_trainer(tmp_path, dtype, activation_checkpointing=checkpointing)
    measured = steady_state_peak(trainer, model)
    estimated = memory.estimate(cfg, model, seq_len=T)["total"]
    assert abs(estimated - measured) <= 0.2 * measured, (estimated / 2**20, measured / 2**20)


def test_activation_checkpointing_gives_the_same_gradients_with_less_memory(tmp_path):
    grads, peaks = [], []
    for checkpointing in (False, True):
        trainer, model, _ = batch_trainer(tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        batch = next(trainer._train_batches())
        peaks.append(memory.measure_peak(lambda t=trainer, b=batch: t.edit_step(b, training=True)))
        grads.append({n: p.grad.clone() for n, p in trainer.editor.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)
    assert peaks[1] < peaks[0]


def saved_bytes(model, inner) -> int:
    """Bytes autograd keeps for a forward pass whose only trainable weights are ``inner``."""
    leaves = {n: model.get_parameter(n).detach().clone().requires_grad_() for n in inner}
    frozen = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *leaves.values()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in frozen:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 1000, (4, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        functional_call(model, leaves, (ids,))
    return sum(saved.values())


def test_blocks_below_the_edited_ones_keep_no_activations():
    # the same top blocks edited; 1 block or 5 blocks below them: the same activations are kept
    def mlps(blocks):
        return [f"model.layers.{i}.mlp.{w}.weight" for i in blocks for w in ("gate_proj", "up_proj", "down_proj")]

    small = saved_bytes(tiny_gqa_llama(4), mlps((1, 2, 3)))
    large = saved_bytes(tiny_gqa_llama(8), mlps((5, 6, 7)))
    assert small == large
    assert blocks.grad_blocks(tiny_gqa_llama(8), INNER) == [f"model.layers.{i}" for i in range(1, 8)]


# -- model configs of current decoders --------------------------------------------------------------------------

LARGE = {
    "llama2-7b": (6.74e9, 32),
    "llama3-8b": (8.03e9, 32),
    "qwen2.5-7b": (7.62e9, 28),
    "mistral-7b": (7.24e9, 32),
    "gemma2-2b": (2.61e9, 26),
}


def model_config(name):
    return OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(os.path.join(ROOT, "config", "model", f"{name}.yaml"))
    )


@pytest.mark.parametrize("name", sorted(LARGE))
def test_a_tiny_model_of_each_new_family_passes_the_editor_contract(name):
    mcfg = model_config(name)
    n_params, n_layers = LARGE[name]
    assert mcfg.arch.num_hidden_layers == n_layers
    # the real architecture, on the meta device: its size is the published one
    meta = memory.meta_model(mcfg)
    assert abs(sum(p.numel() for p in meta.parameters()) / n_params - 1) < 0.01
    # a tiny random version from the same config class, with the real number of blocks
    arch = dict(mcfg.arch)
    arch.update(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    if "head_dim" in arch:
        arch["head_dim"] = 8
    config = transformers.AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    model = freeze(getattr(transformers, mcfg.class_name)(config))
    inner = list(mcfg.inner_params)
    check_inner_params(model, inner)
    assert sorted({n.split(".")[2] for n in inner}) == [str(n_layers - 3), str(n_layers - 2), str(n_layers - 1)]
    cfg = make_config("llama", **{"model.inner_params": inner, "model.name": mcfg.name})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = MEND(model, cfg)
    editor.train()
    batch = next(SyntheticEdits(4, seed=0).edit_generator(2))["edit_inner"]
    edited, _ = editor.edit(batch)
    changed = [n for n in inner if not torch.equal(edited.current_weight(n), model.get_parameter(n))]
    assert changed == inner  # every edited weight moved ...
    assert set(edited.weights) == set(inner)  # ... and nothing else was replaced
    for k, v in model.state_dict().items():  # the base model is untouched
        assert torch.equal(v, before[k]), k
    assert not torch.equal(edited(**{"input_ids": batch["input_ids"]}), editor(**{"input_ids": batch["input_ids"]}))


@pytest.mark.parametrize("name", sorted(LARGE))
def test_the_estimate_of_each_large_config_needs_no_download(name):
    cfg = make_config("llama", **{"data.n_edits": 5, "batch_size": 10, "mend.rank": 1920})
    cfg.model = model_config(name)
    cfg.model.dtype = "bfloat16"
    parts = memory.estimate(cfg, world_size=2)
    assert parts["base model weights"] == pytest.approx(2 * LARGE[name][0], rel=0.02)
    assert parts["total"] > parts["base model weights"] and "DDP gradient buckets" in parts
