"""Editors and edits that travel: a saved editor (Editor.save_pretrained / from_pretrained, editor_io.py), python -m
edit push, and an edit as a PEFT LoRA adapter (Editor.save_peft_adapter, python -m edit apply --peft-out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import GPT2_INNER, LLAMA_INNER, make_config
from peft import PeftModel
from safetensors import safe_open
from test_edit import REQUESTS, editor_with_statistics, ids_of, save_archive, tiny_model, tokenizer  # noqa: F401

import edit
import editor_io
from algs import editor_class
from checkpoints import base_model_identity
from edit import Editor, EditRequest, PatchError
from errors import CheckpointError, HubError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INNER = {"gpt2": GPT2_INNER, "llama": LLAMA_INNER}


def logits(model, x):
    """The logits of one of our EditedModels or of a transformers / PEFT model."""
    out = model(x, torch.ones_like(x)) if callable(getattr(model, "push", None)) else model(input_ids=x).logits
    return out.detach()


def run_dir_of(editor: Editor, root, results: dict | None = None):
    """A training run's directory as python -m run leaves it: checkpoints/best.pt, results.json."""
    (root / "checkpoints").mkdir(parents=True)
    save_archive(editor, root / "checkpoints" / "best.pt")
    if results is not None:
        (root / "results.json").write_text(json.dumps(results))
    return root


# ------------------------------------------------------------------------------------------------------
# A saved editor
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_saved_editor_is_small_and_gives_the_same_patches_and_logits(arch, tokenizer, tmp_path):  # noqa: F811
    editor = editor_with_statistics(arch, tokenizer)
    out = editor.save_pretrained(str(tmp_path / "editor"))
    assert sorted(os.listdir(out)) == ["README.md", "editor.safetensors", "editor_config.json"]
    with safe_open(os.path.join(out, "editor.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    base_names = set(dict(editor.model.named_parameters()))
    assert not base_names & set(saved)  # the base model's weights are not in it
    assert sum(t.numel() for t in saved.values()) < sum(p.numel() for p in editor.model.parameters()) / 10
    assert any(k.endswith(".count") for k in saved)  # the normalisation statistics travel with the weights

    # loaded on a fresh copy of the base model, it makes the same patches, bit for bit
    loaded = Editor.from_pretrained(out, model=tiny_model(arch, len(tokenizer)), tokenizer=tokenizer)
    assert loaded.config.alg == "mend" and loaded.inner_params == INNER[arch]
    assert loaded.config.mend.edit_lr == editor.config.mend.edit_lr
    ours, theirs = editor.apply(REQUESTS, mode="sequential"), loaded.apply(REQUESTS, mode="sequential")
    for p, q in zip(ours.patches, theirs.patches):
        for name in INNER[arch]:
            assert torch.equal(p.factors[name][0], q.factors[name][0])
            assert torch.equal(p.factors[name][1], q.factors[name][1])
            assert torch.equal(p.alphas[name], q.alphas[name])
    x = ids_of(tokenizer)
    assert torch.equal(logits(ours.model, x), logits(theirs.model, x))
    assert not torch.allclose(logits(ours.model, x), logits(editor.base(), x))  # the edit took effect

    with pytest.raises(FileExistsError, match="not empty"):
        editor.save_pretrained(out)
    editor.save_pretrained(out, overwrite=True)
    # python -m edit's --archive takes a saved editor too
    assert Editor.from_archive(out, model=tiny_model(arch, len(tokenizer)), tokenizer=tokenizer).path == out


def test_a_saved_editor_refuses_another_base_model(tokenizer, tmp_path):  # noqa: F811
    out = editor_with_statistics("gpt2", tokenizer).save_pretrained(str(tmp_path / "editor"))
    with pytest.raises(CheckpointError, match="trained for a GPT2LMHeadModel"):
        Editor.from_pretrained(out, model=tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)


def test_ultraedit_saves_its_settings_and_the_statistics_it_starts_from(tokenizer, tmp_path):  # noqa: F811
    model = tiny_model("llama", len(tokenizer))
    cfg = make_config("llama", alg="ultraedit", **{"ultraedit.lr": 0.003})
    alg = editor_class("ultraedit")(model, cfg).eval()
    editor = Editor(alg, tokenizer, cfg, {}, "ultraedit-editor")
    editor.apply(REQUESTS[:2])  # statistics from earlier edits: what the next editor starts from
    editor = Editor(alg, tokenizer, cfg, {}, "ultraedit-editor")
    start = {k: v.clone() for k, v in alg.state_dict().items()}
    assert all(v.abs().sum() > 0 for k, v in start.items() if k.endswith(".count"))
    editor.apply(REQUESTS[2:])  # moves the statistics; what is saved is the state the editor starts from
    out = editor.save_pretrained(str(tmp_path / "ultraedit"))
    assert all(torch.equal(alg.state_dict()[k], v) for k, v in editor.alg.state_dict().items())  # left as it was

    loaded = Editor.from_pretrained(out, model=tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)
    assert loaded.config.alg == "ultraedit" and loaded.config.ultraedit.lr == 0.003
    for k, v in loaded.alg.state_dict().items():
        assert torch.equal(v, start[k]), k
    ours, theirs = editor.apply(REQUESTS[2:]), loaded.apply(REQUESTS[2:])
    x = ids_of(tokenizer)
    assert torch.equal(logits(ours.model, x), logits(theirs.model, x))
    for name in LLAMA_INNER:
        assert torch.equal(ours.model.weights[name], theirs.model.weights[name])


def test_the_model_card_holds_the_evaluation_table_and_the_base_model(tokenizer, tmp_path):  # noqa: F811
    editor = editor_with_statistics("gpt2", tokenizer)
    results = {
        "results": {"edit/acc_val": 0.8125, "edit/acc_pre_val": 0.0625, "perplexity/drawdown_val": 0.0042},
        "untrained": {"edit/acc_val": 0.1875},
        "train": {"steps": 1200, "best_step": 1100, "seconds": 60.0, "validations": [{"step": 1}] * 50},
        "config": {},
    }
    run = run_dir_of(editor, tmp_path / "run", results)
    out = editor_io.save_from_archive(str(run), str(tmp_path / "saved"))  # no base model loaded for this
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "edit success (edit/acc_val)" in card and "0.812" in card and "0.188" in card and "1200 steps" in card
    assert "GPT2LMHeadModel" in card and "Editor.from_pretrained" in card
    for name, info in editor.meta["base_model"]["edited_weights"].items():
        assert f"`{name}` | {info['shape']} | `{info['sha256']}`" in card
    record = json.loads(open(os.path.join(out, "editor_config.json"), encoding="utf-8").read())
    assert "validations" not in record["evaluation"]["train"]  # the learning curve stays with the run
    assert record["base_model"] == editor.meta["base_model"] and record["alg"] == "mend"
    # an editor loaded from the saved directory, saved again, keeps the table
    loaded = Editor.from_pretrained(out, model=tiny_model("gpt2", len(tokenizer)), tokenizer=tokenizer)
    again = loaded.save_pretrained(str(tmp_path / "again"))
    assert "0.812" in open(os.path.join(again, "README.md"), encoding="utf-8").read()


def test_the_base_models_revision_is_recorded_and_shown(tokenizer, tmp_path):  # noqa: F811
    editor = editor_with_statistics("llama", tokenizer)
    editor.model.config._commit_hash = "0123abcd"  # as transformers sets it on a model loaded from the hub
    editor.meta["base_model"] = base_model_identity(editor.model, editor.inner_params)
    assert editor.meta["base_model"]["revision"] == "0123abcd"
    out = editor.save_pretrained(str(tmp_path / "editor"))
    assert "- revision: `0123abcd`" in open(os.path.join(out, "README.md"), encoding="utf-8").read()


def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HuggingFace hub cannot be reached") as e:
        Editor.from_pretrained("nobody-here/no-such-editor")
    assert "\n" not in str(e.value) and "offline" in str(e.value)
    with pytest.raises(HubError, match="no such run, checkpoint or saved editor here"):
        Editor.from_archive("no-such-outputs/run")  # --archive: a missing relative path reads as a hub id too
    with pytest.raises(CheckpointError, match="no such directory"):
        Editor.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a saved editor"):
        Editor.from_pretrained(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------------
# python -m edit push
# ------------------------------------------------------------------------------------------------------
def test_push_without_the_hub_says_so_in_one_line_and_exits_2(tokenizer, tmp_path, monkeypatch, capsys):  # noqa: F811
    saved = editor_with_statistics("gpt2", tokenizer).save_pretrained(str(tmp_path / "editor"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert edit.main(["push", "--archive", saved, "--repo", "me/editor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline" in err and "nothing was uploaded" in err

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(editor_io, "get_token", lambda: None)
    assert edit.main(["push", "--archive", saved, "--repo", "me/editor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no HuggingFace token" in err

    # with a token, on a machine without the network (this one, the real probe): the hub cannot be reached; where
    # there is one, the hub refuses the made-up token
    assert edit.main(["push", "--archive", saved, "--repo", "me/editor", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("hub cannot be reached" in err or "upload to me/editor failed" in err), err


def test_push_from_the_shell_offline_is_one_line(tokenizer, tmp_path):  # noqa: F811
    saved = editor_with_statistics("gpt2", tokenizer).save_pretrained(str(tmp_path / "editor"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "edit", "push", "--archive", saved, "--repo", "me/editor"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "offline" in proc.stderr, proc.stderr


def test_push_uploads_a_training_run_as_a_saved_editor(tokenizer, tmp_path, monkeypatch, capsys):  # noqa: F811
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
            calls.append(("create", repo_id, private, exist_ok))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=""):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path)), commit_message))

    monkeypatch.setattr(editor_io, "HfApi", FakeApi)
    monkeypatch.setattr(editor_io, "hub_unreachable_reason", lambda: None)
    run = run_dir_of(editor_with_statistics("gpt2", tokenizer), tmp_path / "run", None)
    assert edit.main(["push", "--archive", str(run), "--repo", "me/editor", "--token", "hf_x", "--private"]) == 0
    assert calls[0] == ("token", "hf_x") and calls[1] == ("create", "me/editor", True, True)
    assert calls[2][:3] == ("upload", "me/editor", ["README.md", "editor.safetensors", "editor_config.json"])
    assert "uploaded" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------
# An edit as a PEFT LoRA adapter
# ------------------------------------------------------------------------------------------------------
def check_adapter(result_model, adapter_dir, fresh_base, x, exact: bool = False):
    """The adapter on a fresh copy of the base model runs as our edited model; merged, it is our materialised one."""
    peft_model = PeftModel.from_pretrained(fresh_base, adapter_dir)
    ours = logits(result_model, x)
    torch.testing.assert_close(logits(peft_model, x), ours, rtol=0, atol=1e-5)
    merged = peft_model.merge_and_unload().state_dict()
    materialised = result_model.materialize().state_dict()
    assert set(merged) == set(materialised)
    for k, w in materialised.items():
        if exact or k not in result_model.weights:
            assert torch.equal(merged[k], w), k
        else:
            torch.testing.assert_close(merged[k], w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_peft_adapter_runs_and_merges_as_our_edited_model(arch, tokenizer, tmp_path):  # noqa: F811
    editor = editor_with_statistics(arch, tokenizer)
    result = editor.apply(REQUESTS, mode="sequential")  # three patches stacked on each weight
    out = editor.save_peft_adapter(result.model, str(tmp_path / "adapter"))
    config = json.loads(open(os.path.join(out, "adapter_config.json"), encoding="utf-8").read())
    assert config["fan_in_fan_out"] == (arch == "gpt2")  # GPT-2's Conv1D stores its weights (d_in, d_out)
    assert sorted(config["target_modules"]) == sorted(n.rsplit(".", 1)[0] for n in INNER[arch])
    positions = sum(p.meta["n_positions"][INNER[arch][0]] for p in result.patches)
    assert config["r"] == positions and config["lora_alpha"] == positions  # the factors as they are, scaling 1
    assert json.loads(open(os.path.join(out, "edits.json"), encoding="utf-8").read())["full_rank_modules"] == []
    check_adapter(result.model, out, tiny_model(arch, len(tokenizer)), ids_of(tokenizer))


@pytest.mark.parametrize("alg", ["efk", "ultraedit"])
def test_a_dense_patch_is_exported_exactly_at_full_rank(alg, tokenizer, tmp_path):  # noqa: F811
    """EFK's update has no low-rank form; UltraEdit's has one on a weight with more inputs than the edit has
    positions only (here c_proj, 128 inputs, and not c_fc, 32 inputs): a mixed adapter."""
    cfg = make_config("gpt2", alg=alg, **({"ultraedit.lr": 0.003} if alg == "ultraedit" else {}))
    editor = Editor(editor_class(alg)(tiny_model("gpt2", len(tokenizer)), cfg).eval(), tokenizer, cfg, {}, alg)
    long = [EditRequest(f"Item {i} is", " one two three four five six seven eight nine ten eleven") for i in range(4)]
    result = editor.apply(long if alg == "ultraedit" else REQUESTS[:1])
    (patch,) = result.patches
    assert GPT2_INNER[0] in patch.dense and (alg == "efk") == (GPT2_INNER[1] in patch.dense)
    out = editor.save_peft_adapter(result.model, str(tmp_path / "adapter"))
    full = json.loads(open(os.path.join(out, "edits.json"), encoding="utf-8").read())["full_rank_modules"]
    assert full == sorted(n.rsplit(".", 1)[0] for n in patch.dense)
    x = ids_of(tokenizer)
    assert not torch.allclose(logits(result.model, x), logits(editor.base(), x))
    check_adapter(result.model, out, tiny_model("gpt2", len(tokenizer)), x, exact=alg == "efk")


def test_an_editor_that_trained_its_base_model_refuses_an_adapter(tokenizer, tmp_path, monkeypatch):  # noqa: F811
    editor = editor_with_statistics("gpt2", tokenizer)
    result = editor.apply(REQUESTS[:1])
    monkeypatch.setattr(editor.alg, "trained_base", lambda: {"transformer.wte.weight": torch.zeros(1)})
    with pytest.raises(PatchError, match="train_base"):
        editor.save_peft_adapter(result.model, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_cli_apply_peft_out_matches_out_from_a_saved_editor(tokenizer, tmp_path):  # noqa: F811
    """python -m edit apply --archive <saved editor> --out --peft-out: the adapter on the base model gives --out's
    logits, merged it is --out; a non-empty --peft-out is refused before anything is computed."""
    base_dir = tmp_path / "base"
    editor = editor_with_statistics("gpt2", tokenizer)
    editor.model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    editor.config.model.name = str(base_dir)
    saved = editor.save_pretrained(str(tmp_path / "editor"))
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": r.prompt, "target": r.target}) + "\n" for r in REQUESTS))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out, adapter = tmp_path / "edited", tmp_path / "adapter"
    cmd = [sys.executable, "-m", "edit", "apply", "--archive", saved, "--requests", str(requests), "--mode"]
    cmd += ["sequential", "--out", str(out), "--peft-out", str(adapter)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PEFT LoRA adapter" in proc.stdout
    edited = transformers.AutoModelForCausalLM.from_pretrained(out)
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    x = ids_of(tokenizer)
    torch.testing.assert_close(logits(peft_model, x), logits(edited, x), rtol=0, atol=1e-5)
    merged = peft_model.merge_and_unload().state_dict()
    for k, w in edited.state_dict().items():
        torch.testing.assert_close(merged[k], w, rtol=1e-6, atol=1e-6)

    cmd = cmd[: cmd.index("--out")] + ["--peft-out", str(adapter)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr
