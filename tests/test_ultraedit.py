"""UltraEdit (algs/ultraedit): against the authors' code number for number, and as an editor of this project.

``tests/golden/ultraedit-<arch>.*`` holds what the authors' code (XiaojieGu/UltraEdit, run by
``tests/golden/make_ultraedit.py``) computed on the tiny random GPT-2 (Conv1D) and GPT-Neo (nn.Linear) of the MEND
golden files: three turns of four edits one after another, the edited weights after each turn and the lifelong
normalisation's statistics. The editor here, fed the same edits, must give the same weights after every turn (to
float32 rounding, measured against the size of that turn's update) and the same statistics; and a changed update (the
ridge constant, the normalisation, statistics that are not carried over, the chunking) must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TINY, make_config
from safetensors.torch import load_file
from test_run import INNER, ROOT, run_cli
from test_run import workspace as workspace  # noqa: F401  (the fixture: a tiny GPT-2 on disk and a gen data set)

from algs.ultraedit.editor import LifelongNorm, UltraEdit, chunked_factors
from config_schema import ModelConfig, config_for, validate_config
from data_classes.batches import prompt_target_batch
from data_classes.requests import EditRequest
from edit import Editor
from errors import ConfigError
from losses import masked_log_probs
from patches import Patch

GOLDEN = Path(__file__).parent / "golden"


def golden_model(arch: str):
    meta = json.loads((GOLDEN / f"mend-original-{arch}.json").read_text())
    tensors = load_file(str(GOLDEN / f"mend-original-{arch}.safetensors"))
    config_cls = transformers.AutoConfig.for_model(meta["model_config"]["model_type"]).__class__
    model = getattr(transformers, meta["model_class"])(config_cls.from_dict(meta["model_config"]))
    missing, unexpected = model.load_state_dict(
        {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    model.eval().requires_grad_(False)
    return model, meta["model_class"]


def golden_errors(arch: str, **overrides) -> tuple:
    """Our editor on the golden turns: the largest error of the edited weights after a turn (relative to the size
    of the authors' update in that turn) and of the statistics (relative to their size), over all turns."""
    meta = json.loads((GOLDEN / f"ultraedit-{arch}.json").read_text())
    gold = load_file(str(GOLDEN / f"ultraedit-{arch}.safetensors"))
    model, cls = golden_model(arch)
    settings = {
        "ultraedit.lr": meta["lr"],
        "ultraedit.ridge": meta["ridge"],
        "ultraedit.chunk_size": meta["chunk_size"],
    }
    cfg = config_for(
        ModelConfig(name=f"golden-{arch}", class_name=cls, inner_params=meta["inner_params"]),
        "gen",
        "ultraedit",
        **{**settings, **overrides},
    )
    editor = UltraEdit(model, cfg)
    base = {n: model.get_parameter(n).clone() for n in meta["inner_params"]}
    current, weight_err, stats_err = editor, 0.0, 0.0
    for t, turn in enumerate(meta["turns"]):
        batch = prompt_target_batch([(e["prompt"], e["target"]) for e in turn], pad_id=0)
        current, _ = current.edit(batch)
        for n in meta["inner_params"]:
            before = base[n] if t == 0 else gold[f"after{t - 1}.{n}"]
            theirs = gold[f"after{t}.{n}"]
            err = (current.weights[n] - theirs).norm() / (theirs - before).norm()
            weight_err = max(weight_err, err.item())
        for key, norm in editor.norms.items():
            for ours, buf in (("count", "n"), ("mean", "mean"), ("var_sum", "var"), ("std", "std")):
                theirs = gold[f"stats{t}.{key}.{buf}"]
                stats_err = max(stats_err, ((getattr(norm, ours) - theirs).norm() / theirs.norm()).item())
    for n, w in base.items():  # the base model is never written
        assert torch.equal(model.get_parameter(n), w)
    return weight_err, stats_err


@pytest.mark.parametrize("arch", ["gpt2", "gptneo"])
def test_the_authors_code_gives_the_same_weights_and_statistics_after_every_turn(arch):
    weight_err, stats_err = golden_errors(arch)
    assert weight_err < 1e-4 and stats_err < 1e-5, (weight_err, stats_err)


def _no_normalisation(self, x):
    return x


@pytest.mark.parametrize(
    "change",
    ["ridge", "lr", "chunking", "no normalisation", "statistics not carried", "statistics per weight"],
)
def test_a_changed_update_is_caught_by_the_golden_values(change, monkeypatch):
    """The comparison above is sharp enough to see each of these changes, by orders of magnitude."""
    overrides = {}
    if change == "ridge":
        overrides = {"ultraedit.ridge": 1.1}
    elif change == "lr":
        overrides = {"ultraedit.lr": 1.1e-4}
    elif change == "chunking":
        overrides = {"ultraedit.chunk_size": 4}  # one pass per turn instead of two
    elif change == "no normalisation":
        monkeypatch.setattr(LifelongNorm, "forward", _no_normalisation)
    elif change == "statistics not carried":  # every edit starts from empty statistics
        edit = UltraEdit.edit

        def edit_from_empty_statistics(self, batch, condition=None, diagnostics=False):
            for norm in self.norms.values():
                for buf in (norm.count, norm.mean, norm.var_sum, norm.std):
                    buf.zero_()
            return edit(self, batch, condition, diagnostics)

        monkeypatch.setattr(UltraEdit, "edit", edit_from_empty_statistics)
    elif change == "statistics per weight":  # not shared by the weights of one shape
        own = {}

        def norm_of(self, name):
            _, d_in, d_out = self.layout[name]
            return own.setdefault(name, LifelongNorm(d_in + d_out))

        monkeypatch.setattr(UltraEdit, "norm_of", norm_of)
    weight_err, stats_err = golden_errors("gpt2", **overrides)
    print(change, weight_err, stats_err)
    assert weight_err > 1e-2, (change, weight_err, stats_err)


# ------------------------------------------------------------------------------------------------
# As an editor of this project
# ------------------------------------------------------------------------------------------------
def one_edit(g: torch.Generator, n_edits: int = 1, target_len: int = 2) -> dict:
    def ids(n):
        return torch.randint(1, 40, (n,), generator=g).tolist()

    rows = [(ids(5), ids(target_len)) for _ in range(n_edits)]
    return prompt_target_batch(rows, pad_id=0)


def target_log_prob(model, batch: dict) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return masked_log_probs(logits, batch["labels"])["log_prob"].item()


def tiny_editor(arch: str, **overrides) -> UltraEdit:
    return UltraEdit(TINY[arch][0](), make_config(arch, alg="ultraedit", **overrides))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ten_sequential_edits_each_raise_their_target_and_the_base_model_is_never_written(arch):
    editor = tiny_editor(arch, **{"ultraedit.lr": 1e-3})
    base = {n: p.clone() for n, p in editor.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    current, rises, n_rows = editor, [], 0
    for _ in range(10):
        batch = one_edit(g)
        before = target_log_prob(current, batch)
        current, info = current.edit(batch)
        rises.append(target_log_prob(current, batch) - before)
        n_rows += int(info["ultraedit/positions"])
    assert min(rises) > 1e-3, rises
    # the statistics were carried from edit to edit: every row of the ten edits, once per weight of that shape
    per_shape = {}
    for name in editor.inner_params:
        per_shape[editor.norm_of(name)] = per_shape.get(editor.norm_of(name), 0) + 1
    for norm, n_weights in per_shape.items():
        assert norm.count.item() == n_rows * n_weights
    assert set(current.weights) == set(editor.inner_params)
    for n, p in editor.model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_with_weights_shares_the_statistics_and_the_state_dict_holds_them():
    editor = tiny_editor("llama", **{"ultraedit.lr": 1e-3})
    g = torch.Generator().manual_seed(1)
    first, second = one_edit(g, n_edits=2), one_edit(g, n_edits=2)
    edited, _ = editor.edit(first)
    assert edited.norms is editor.norms and editor.with_weights({}).norms is editor.norms
    state = editor.state_dict()
    assert {k for k in state if k.endswith(".count")} == {f"norms.{k}.count" for k in editor.norms}
    assert all(state[f"norms.{k}.count"].item() > 0 for k in editor.norms)
    # a fresh editor given the saved state edits on as the first one does; one without it does not
    reloaded = tiny_editor("llama", **{"ultraedit.lr": 1e-3})
    reloaded.load_state_dict(state)
    a, _ = edited.edit(second)
    b, _ = reloaded.with_weights(edited.weights).edit(second)
    c, _ = tiny_editor("llama", **{"ultraedit.lr": 1e-3}).with_weights(edited.weights).edit(second)
    name = editor.inner_params[0]
    torch.testing.assert_close(a.weights[name], b.weights[name], rtol=0, atol=0)
    assert not torch.allclose(a.weights[name], c.weights[name])


def test_an_edit_of_one_target_position_keeps_the_statistics_finite():
    """The authors' update takes the unbiased variance of each chunk's rows, NaN for a single row (one edit with a
    one-token target), which would poison every later edit; here such a chunk adds no variance."""
    editor = tiny_editor("llama", **{"ultraedit.lr": 1e-3})
    g = torch.Generator().manual_seed(3)
    current = editor
    for _ in range(3):
        current, info = current.edit(one_edit(g, target_len=1))
        assert info["ultraedit/positions"] == 1
    for norm in editor.norms.values():  # gate_proj and up_proj share one: each adds its rows
        n_weights = sum(editor.norm_of(n) is norm for n in editor.inner_params)
        assert norm.count.item() == 3 * n_weights and torch.isfinite(norm.std).all() and (norm.std > 0).all()
    assert all(torch.isfinite(w).all() for w in current.weights.values())


def test_a_partial_chunk_enters_the_statistics_and_the_update_at_a_full_chunks_scale():
    """The edit loss is a chunk's mean over its target tokens: a request alone in its chunk would have ``chunk_size``
    times the gradient rows it has in a full chunk, outliers against statistics gathered from full chunks. Alone, it
    gives (and adds to the statistics) the rows it has among ``chunk_size`` copies of itself; the unscaled rows are
    ``chunk_size`` times larger."""
    editor = tiny_editor("llama", **{"ultraedit.chunk_size": 4})
    row = ([5, 9, 11, 3, 7], [21, 30])
    _, alone, _ = editor._factors(prompt_target_batch([row], 0))
    _, full, _ = editor._factors(prompt_target_batch([row] * 4, 0))
    unscaled = chunked_factors(editor, prompt_target_batch([row], 0), 4)[1]
    name = editor.inner_params[0]
    torch.testing.assert_close(alone[name][0], full[name][0][:2], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(unscaled[name][0], 4 * alone[name][0], rtol=1e-4, atol=1e-7)
    assert alone[name][0].abs().max() > 0
    fresh = tiny_editor("llama", **{"ultraedit.chunk_size": 4})
    keys, grads, _ = fresh._factors(prompt_target_batch([row], 0))
    sharing = [n for n in fresh.inner_params if fresh.norm_of(n) is fresh.norm_of(name)]  # one per weight shape
    d_in = fresh.layout[name][1]
    added = torch.cat([grads[n][0] for n in sharing])
    torch.testing.assert_close(fresh.norm_of(name).mean[d_in:], added.mean(0), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(added, torch.cat([alone[n][0] for n in sharing]), rtol=1e-4, atol=1e-8)


def test_the_patch_of_an_edit_is_its_update():
    """Low-rank factors (K, A) where the edit has fewer positions than the layer has inputs, the dense difference
    elsewhere; either way the patch takes the weights to the edited ones."""
    editor = tiny_editor("gpt2", **{"ultraedit.lr": 1e-3})
    batch = one_edit(torch.Generator().manual_seed(2), n_edits=4, target_len=10)  # 40 positions: c_fc has 32 inputs
    edited, info = editor.edit(batch)
    assert info["ultraedit/positions"] == 40
    patch = Patch.from_edit(editor, edited, editor.inner_params, {})
    c_fc, c_proj = editor.inner_params
    assert c_fc in patch.dense and c_proj in patch.factors and patch.factors[c_proj][0].shape == (40, 128)
    for name in editor.inner_params:
        w = editor.model.get_parameter(name)
        torch.testing.assert_close(patch.apply(name, w), edited.weights[name], rtol=1e-6, atol=1e-6)


def test_the_settings_are_checked_with_the_key_named():
    cfg = make_config("llama", alg="ultraedit", eval_only=True)
    validate_config(cfg, algs=["ultraedit"], tasks=["gen"])
    UltraEdit.check_config(cfg)  # nothing to train: eval_only needs no archive
    for key, value in (("lr", 0.0), ("lr", 1e4), ("ridge", 0.0), ("ridge", -1.0), ("chunk_size", 0)):
        bad = make_config("llama", alg="ultraedit", **{f"ultraedit.{key}": value})
        with pytest.raises(ConfigError, match=rf"ultraedit\.{key}="):
            validate_config(bad, algs=["ultraedit"], tasks=["gen"])
    seq2seq = make_config("llama", alg="ultraedit", eval_only=True, **{"model.kind": "seq2seq"})
    with pytest.raises(ConfigError, match="model.kind=seq2seq"):
        UltraEdit.check_config(seq2seq)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_the_gen_experiment_runs_and_python_m_edit_carries_the_statistics(workspace, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = run_cli(workspace, "val_steps=3", "ultraedit.lr=1e-3", run_dir=run_dir, alg="ultraedit")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "results.json").read_text())
    assert report["config"]["alg"] == "ultraedit" and report["train"]["steps"] == 0
    assert report["results"]["eval_time/n_edits"] == 3 and "edit/acc_val" in report["results"]

    editor = Editor.from_archive(str(run_dir), cache_dir=workspace["cache"])
    requests = [{"prompt": "The old museum", "target": "market square"}, {"prompt": "Winter", "target": "harbour"}]
    result = editor.apply(requests, mode="sequential")
    assert len(result.model.patches) == 2
    counts = [norm.count.item() for norm in editor.alg.norms.values()]
    n_target_tokens = sum(len(editor.tokenize(EditRequest.from_dict(r, "request")).target) for r in requests)
    # each weight of the run (one c_fc, one c_proj: two shapes) added every target position of both edits
    assert counts == [n_target_tokens] * 2


def test_the_counterfact_experiment_runs_and_python_m_edit_eval_evaluates_it(workspace, tmp_path):  # noqa: F811
    run_dir = tmp_path / "cf-run"
    cmd = [
        sys.executable, "-m", "run", "+alg=ultraedit", "+experiment=counterfact", "+model=distilgpt2",
        f"model.name={workspace['model']}", f"model.tokenizer_name={workspace['model']}", f"model.inner_params={INNER}",
        "data.max_countries=40", f"cache_dir={workspace['cache']}", "device=cpu", "wandb.enabled=false",
        "val_steps=2", "eval.final_steps=2", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 0 and "edit/acc_val" in results["results"]
    cmd = [sys.executable, "-m", "edit", "eval", "--archive", str(run_dir), "--n", "2"]
    cmd += ["--cache-dir", workspace["cache"]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 cases (counterfact, embedded, validation)" in proc.stdout
