"""Shared fixtures: tiny models built from config classes (no download) and a synthetic edit set."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import transformers
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config_schema import Config, ModelConfig  # noqa: E402

VOCAB = 64
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


def make_config(arch: str = "llama", **overrides):
    """A full, typed run config for a tiny model, with overrides as dotted keys."""
    _, inner, cls = TINY[arch]
    model = ModelConfig(name=f"tiny-{arch}", class_name=cls, inner_params=inner, kind="causal_lm")
    return config_for(model, overrides.pop("task", "gen"), **overrides)


def config_for(model: ModelConfig, task: str, **overrides):
    """A full, typed run config of ``task`` for ``model`` (MEND, rank 16, quiet), with overrides as dotted keys."""
    cfg = OmegaConf.structured(Config)
    cfg.alg, cfg.task = "mend", task
    cfg.model = model
    cfg.mend.rank = 16
    cfg.wandb.enabled = False
    cfg.silent = True
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


class SyntheticEdits:
    """Random prompts with a 1-token target; the equivalence input drops the first prompt token.

    Mirrors the batch contract of the real data classes (edit_inner / edit_outer / loc / cond).
    """

    def __init__(self, n: int, n_edits: int = 1, prompt_len: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.prompts = torch.randint(1, VOCAB, (n, prompt_len), generator=g)
        self.targets = torch.randint(1, VOCAB, (n, 1), generator=g)
        self.locs = torch.randint(1, VOCAB, (n, prompt_len + 1), generator=g)
        self.n_edits = n_edits
        self.seed = seed

    def __len__(self):
        return len(self.prompts)

    def _batch(self, idx, n_loc):
        ids = torch.cat([self.prompts[idx], self.targets[idx]], 1)
        labels = torch.full_like(ids, -100)
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


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
