"""Shared fixtures: tiny models built from config classes (no download) and a synthetic edit set."""

from __future__ import annotations

import pytest
import torch
import transformers

from config_schema import ModelConfig, config_for
from data_classes.synthetic import VOCAB, SyntheticEdits  # noqa: F401  (re-exported for the tests)

torch.set_num_threads(1)  # tiny models: threading overhead outweighs the work


def tiny_gpt2(n_layer: int = 2, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return freeze(transformers.GPT2LMHeadModel(cfg))


def tiny_llama(n_layer: int = 2, seed: int = 0, vocab: int = VOCAB, tie: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layer,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    return freeze(transformers.LlamaForCausalLM(cfg))


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


GPT2_INNER = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
LLAMA_INNER = [
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]
TINY = {"gpt2": (tiny_gpt2, GPT2_INNER, "GPT2LMHeadModel"), "llama": (tiny_llama, LLAMA_INNER, "LlamaForCausalLM")}


def make_config(arch: str = "llama", alg: str = "mend", **overrides):
    """A full, typed run config of editor ``alg`` for a tiny model, with overrides as dotted keys. MEND's rank is 16
    (the tiny models' layers are 32 and 64 wide)."""
    _, inner, cls = TINY[arch]
    model = ModelConfig(name=f"tiny-{arch}", class_name=cls, inner_params=inner, kind="causal_lm")
    return config_for(model, overrides.pop("task", "gen"), alg, **{"mend.rank": 16, **overrides})


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
