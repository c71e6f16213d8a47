"""``+model=hf model.name=<hub id or directory>``: the class, kind, embedding module and edited weights (the MLPs of the
last blocks) read from the model's config, the same names as config/model/*.yaml give, for every supported
architecture; offline, a hub id fails with the loaders' one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from omegaconf import OmegaConf
from test_qa import tiny_t5, word_tokenizer, write_zsre, zsre_records

import run
from config_schema import compose_config
from errors import ConfigError, ModelLoadError
from models import as_classifier, check_inner_params, get_model
from models.architectures import ARCHITECTURES, default_edited_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_MODEL = os.path.join(ROOT, "config", "model")

# Each supported architecture's config/model file and the sizes of that model's config.json.
MODEL_FILES = {
    "gpt2": ("gpt2.yaml", {"n_layer": 12}),
    "gpt_neo": ("gptneo27.yaml", {"num_layers": 32, "attention_types": [[["global", "local"], 16]]}),
    "gptj": ("gptj.yaml", {"n_layer": 28}),
    "llama": ("llama2-7b.yaml", {"num_hidden_layers": 32}),
    "mistral": ("mistral-7b.yaml", {"num_hidden_layers": 32}),
    "qwen2": ("qwen2.5-7b.yaml", {"num_hidden_layers": 28}),
    "gemma2": ("gemma2-2b.yaml", {"num_hidden_layers": 26}),
    "t5": ("t5small.yaml", {"num_layers": 8, "feed_forward_proj": "gated-gelu"}),
    "bart": ("bart-base.yaml", {"encoder_layers": 6, "decoder_layers": 6}),
    "bert": ("bert-base.yaml", {"num_hidden_layers": 12}),
}

# Tiny sizes, per architecture, for building a model from its config class (no weights are downloaded).
TINY = {
    "gpt2": {"n_layer": 4, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32},
    "gpt_neo": {"num_layers": 4, "hidden_size": 16, "num_heads": 2, "vocab_size": 64, "max_position_embeddings": 32,
                "attention_types": [[["global", "local"], 2]]},
    "gptj": {"n_layer": 4, "n_embd": 16, "n_head": 2, "rotary_dim": 4, "vocab_size": 64, "n_positions": 32},
    "t5": {"num_layers": 3, "num_decoder_layers": 3, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2,
           "vocab_size": 64, "feed_forward_proj": "gated-gelu"},
    "bart": {"encoder_layers": 3, "decoder_layers": 3, "d_model": 16, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2, "vocab_size": 64,
             "max_position_embeddings": 32},
    "bert": {"num_hidden_layers": 4, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "vocab_size": 64, "max_position_embeddings": 32},
}  # fmt: skip
LLAMA_LIKE_TINY = {"num_hidden_layers": 4, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                   "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64,
                   "max_position_embeddings": 32}  # fmt: skip


def hf_config(*overrides):
    return compose_config(["+alg=mend", "+experiment=gen", "+model=hf", *overrides])


@pytest.mark.parametrize("model_type", sorted(MODEL_FILES))
def test_the_inferred_weights_are_those_the_model_file_lists(model_type):
    name, sizes = MODEL_FILES[model_type]
    written = OmegaConf.load(os.path.join(CONFIG_MODEL, name))
    config = transformers.AutoConfig.for_model(model_type, **sizes)
    inferred, _ = default_edited_weights(model_type, config)
    assert inferred == list(written.inner_params)
    arch = ARCHITECTURES[model_type]
    assert (arch.class_name, arch.kind, arch.embedding_module) == (
        written.class_name,
        written.kind,
        written.get("embedding_module"),
    )


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_inferred_weights_are_2d_weights_of_the_built_model(model_type):
    config = transformers.AutoConfig.for_model(model_type, **TINY.get(model_type, LLAMA_LIKE_TINY))
    arch = ARCHITECTURES[model_type]
    model = getattr(transformers, arch.class_name)(config)
    if arch.kind == "classifier":
        model = as_classifier(model)
    names, _ = default_edited_weights(model_type, config)
    check_inner_params(model, names)  # every name a distinct 2-D weight of the model
    model.get_submodule(arch.embedding_module)
    blocks = {int(part) for n in names for part in n.split(".") if part.isdigit()}
    n_blocks = 3 if arch.kind == "seq2seq" else 4
    assert blocks == set(range(n_blocks - arch.n_edited, n_blocks))  # the last blocks of each stack


def _save(tmp_path, which: str):
    torch.manual_seed(0)
    if which == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY["gpt2"]))
    elif which == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE_TINY))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY["t5"]))
    model.save_pretrained(tmp_path / which)
    return str(tmp_path / which)


@pytest.mark.parametrize(
    "which, class_name, kind, first",
    [
        ("gpt2", "GPT2LMHeadModel", "causal_lm", "transformer.h.1.mlp.c_fc.weight"),
        ("llama", "LlamaForCausalLM", "causal_lm", "model.layers.1.mlp.gate_proj.weight"),
        ("t5", "T5ForConditionalGeneration", "seq2seq", "encoder.block.1.layer.1.DenseReluDense.wi_0.weight"),
    ],
)
def test_a_local_directory_gives_a_config_that_loads_offline(tmp_path, monkeypatch, caplog, which, class_name, kind,
                                                             first):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = _save(tmp_path, which)
    with caplog.at_level("INFO", logger="models"):
        cfg = run.infer_model(hf_config(f"model.name={directory}", f"cache_dir={tmp_path / 'cache'}"))
    assert (cfg.model.class_name, cfg.model.kind) == (class_name, kind)
    assert cfg.model.inner_params[0] == first and len(cfg.model.inner_params) in (6, 9, 12)
    assert f"+model=hf: {directory} is a" in caplog.text and class_name in caplog.text  # said at start
    model = get_model(cfg.model, str(tmp_path / "cache"))
    check_inner_params(model, list(cfg.model.inner_params))


def test_keys_given_on_the_command_line_are_kept(tmp_path):
    directory = _save(tmp_path, "gpt2")
    given = ["model.inner_params=[transformer.h.0.mlp.c_proj.weight]", "model.kind=causal_lm"]
    cfg = run.infer_model(hf_config(f"model.name={directory}", *given))
    assert list(cfg.model.inner_params) == ["transformer.h.0.mlp.c_proj.weight"]
    assert cfg.model.class_name == "GPT2LMHeadModel"


def test_a_model_file_is_used_as_written_and_a_typo_is_refused_first(tmp_path):
    cfg = compose_config(["+alg=mend", "+experiment=gen", "+model=distilgpt2"])
    assert run.infer_model(cfg) is cfg  # nothing to infer: no config is read
    with pytest.raises(ConfigError, match="lrr"):
        run.infer_model(hf_config("model.name=gpt2", "+lrr=3"))  # before any attempt to reach the hub


def test_a_hub_id_offline_and_an_unknown_architecture_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*HuggingFace hub could not be reached.*model.name=/path/to/gpt2"):
        run.infer_model(hf_config("model.name=gpt2", f"cache_dir={tmp_path}"))
    other = tmp_path / "opt"
    transformers.AutoConfig.for_model("opt").save_pretrained(other)
    with pytest.raises(ModelLoadError, match=r"is a 'opt' model.*Set model.class_name, model.kind and model.inner_"):
        run.infer_model(hf_config(f"model.name={other}", f"cache_dir={tmp_path}"))


@pytest.mark.parametrize("which", ["gpt2", "t5"])
def test_python_m_run_with_model_hf_trains_and_records_the_inferred_config(tmp_path, which):
    """The qa experiment end to end, the model named by its directory alone (a causal LM and an encoder-decoder)."""
    tok = word_tokenizer("bart" if which == "gpt2" else "t5")
    if which == "t5":
        tiny_t5(len(tok)).save_pretrained(tmp_path / which)
    else:
        config = transformers.GPT2Config(**{**TINY["gpt2"], "vocab_size": len(tok)})
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / which)
    tok.save_pretrained(tmp_path / which)
    data = write_zsre(tmp_path / "zsre", zsre_records(8), zsre_records(4))
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "run", "+alg=mend", "+experiment=qa", "+model=hf", f"model.name={tmp_path / which}",
        f"data.path={data}", f"cache_dir={tmp_path / 'cache'}", "device=cpu", "wandb.enabled=false", "mend.rank=4",
        "max_iters=2", "val_interval=2", "val_steps=2", "eval.compare_untrained=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "+model=hf:" in out
    model = json.loads((run_dir / "results.json").read_text())["config"]["model"]
    expected = "T5ForConditionalGeneration" if which == "t5" else "GPT2LMHeadModel"
    assert model["class_name"] == expected and model["kind"] == ("seq2seq" if which == "t5" else "causal_lm")
    assert model["inner_params"][-1].endswith(("wo.weight", "mlp.c_proj.weight"))
