"""EasyEdit's BaseEditor surface (easyedit_api.py, Editor.edit / batch_edit / tok / hparams): an example script of
EasyEdit ported by changing its import and constructor, EasyEdit's signatures, result layout and summary, the edited
model as a plain transformers model, and `python -m edit eval --layout rome` read back as ROME's summariser reads it."""

from __future__ import annotations

import inspect
import json
import math
import runpy
import sys
from collections import defaultdict
from pathlib import Path
from statistics import harmonic_mean, mean

import pytest
import test_edit
import torch
import transformers

import easyedit_api
import edit
import fact_eval
from data_classes.counterfact import read_counterfact
from data_classes.requests import EditRequest
from edit import Editor
from errors import EditRequestError
from fact_metrics import n_gram_entropy
from patches import EditedModel

FIXTURES = Path(__file__).parent / "fixtures"
SCRIPT = FIXTURES / "easyedit_readme_mend.py"
COUNTERFACT = FIXTURES / "counterfact_sample.json"
tokenizer = test_edit.tokenizer  # the real GPT-2 vocabulary (a module fixture)
pytestmark = test_edit.pytestmark
# BaseEditor.edit and BaseEditor.batch_edit in EasyEdit's easyeditor/editors/editor.py: these parameters in this
# order, with these defaults, then **kwargs.
EASYEDIT_PARAMETERS = [
    ("prompts", inspect.Parameter.empty),
    ("target_new", inspect.Parameter.empty),
    ("ground_truth", None),
    ("target_neg", None),
    ("rephrase_prompts", None),
    ("locality_inputs", None),
    ("portability_inputs", None),
    ("sequential_edit", False),
    ("verbose", True),
]
PROMPTS = ["The river city is", "A winter festival", "North of the bridge is the"]
TARGETS = ["castle", "harbour garden", "village"]


@pytest.fixture
def editor(tokenizer):
    return test_edit.editor_with_statistics("gpt2", tokenizer)


@pytest.fixture(scope="module")
def archive(tokenizer, tmp_path_factory):
    """A training run's checkpoint on disk whose base model (a tiny GPT-2) loads from a directory."""
    root = tmp_path_factory.mktemp("easyedit")
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    model_dir = root / "tiny-gpt2"
    editor.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    editor.config.model.name = editor.config.model.tokenizer_name = str(model_dir)
    editor.config.cache_dir = str(root / "cache")
    return test_edit.save_archive(editor, root / "editor.pt")


def score(editor, model, prompt, target):
    toks = editor.tokenize(EditRequest(prompt, target))
    return editor.score(model, [(toks.prompt, toks.target)])[0]


def same_share(before, after):
    return sum(a == b for a, b in zip(before, after)) / len(before)


# -- an EasyEdit script, ported ----------------------------------------------------------------------------------
def test_easyedits_readme_example_runs_with_its_import_and_constructor_changed(archive, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), archive])
    ran = runpy.run_path(str(SCRIPT), run_name="__main__")
    metrics, edited_model, editor = ran["metrics"], ran["edited_model"], ran["editor"]
    prompts, targets, truths, locality = ran["prompts"], ran["target_new"], ran["ground_truth"], ran["locality_inputs"]
    base = editor.base()
    assert [m["case_id"] for m in metrics] == [0, 1, 2]
    for i, m in enumerate(metrics):
        assert set(m) == {"pre", "case_id", "requested_rewrite", "time", "post"}
        assert m["requested_rewrite"] == {
            "prompt": prompts[i],
            "target_new": targets[i],
            "ground_truth": truths[i],
            "portability": {},
            "locality": {k: {"prompt": v["prompt"][i], "ground_truth": v["ground_truth"][i]}
                         for k, v in locality.items()},
        }  # fmt: skip
        assert m["pre"]["rewrite_acc"] == [pytest.approx(score(editor, base, prompts[i], targets[i]).accuracy)]
        assert set(m["pre"]["locality"]) == {"neighborhood_output", "distracting_output"}
        assert set(m["post"]["locality"]) == {f"{k}_{x}" for k in locality for x in ("output", "acc")}
        for key, spec in locality.items():
            before = score(editor, base, spec["prompt"][i], spec["ground_truth"][i]).argmax
            assert m["pre"]["locality"][f"{key}_output"] == [before]
            after = m["post"]["locality"][f"{key}_output"][0]
            assert m["post"]["locality"][f"{key}_acc"] == [pytest.approx(same_share(before, after))]
    # not sequential: the returned model holds the last edit alone, and the last post figures are its own
    plain = EditedModel(edited_model)
    assert metrics[2]["post"]["rewrite_acc"] == [pytest.approx(score(editor, plain, prompts[2], targets[2]).accuracy)]
    assert mean(m["post"]["rewrite_acc"][0] for m in metrics) > mean(m["pre"]["rewrite_acc"][0] for m in metrics)
    printed = capsys.readouterr().out
    summary = easyedit_api.summary_metrics(metrics, show=False)
    assert f"Metrics Summary:  {summary}" in printed
    assert summary["post"]["rewrite_acc"] == pytest.approx(mean(m["post"]["rewrite_acc"][0] for m in metrics))


def test_edit_and_batch_edit_take_easyedits_parameters_in_its_order(editor):
    for method in (Editor.edit, Editor.batch_edit):
        params = list(inspect.signature(method).parameters.values())[1:]
        assert [(p.name, p.default) for p in params[:-1]] == EASYEDIT_PARAMETERS, method.__name__
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD
    locality = {"neighborhood": {"prompt": "The old museum", "ground_truth": "is"}}
    portability = {"one_hop": {"prompt": "The castle is in", "ground_truth": "town"}}
    # positionally, as EasyEdit's order has them: ground_truth, target_neg, rephrase_prompts, locality, portability
    metrics, _, _ = editor.edit(
        PROMPTS[0],
        TARGETS[0],
        "old",
        "market",
        "The city is",
        locality,
        portability,
        False,
        False,
        subject="river city",
    )
    request = metrics[0]["requested_rewrite"]
    assert (request["ground_truth"], request["target_neg"], request["rephrase_prompt"]) == (
        "old",
        "market",
        "The city is",
    )
    assert request["subject"] == "river city" and request["locality"] == {"neighborhood": locality["neighborhood"]}
    assert set(metrics[0]["post"]["portability"]) == {"one_hop_acc"} and "rephrase_acc" in metrics[0]["post"]
    assert editor.tok is editor.tokenizer and editor.hparams is editor.config


def test_the_edited_model_is_a_plain_model_and_the_base_is_written_to_only_when_asked(editor):
    before = {n: p.clone() for n, p in editor.model.named_parameters()}
    metrics, model, weights_copy = editor.edit(PROMPTS[0], TARGETS[0], verbose=False)
    assert isinstance(model, transformers.GPT2LMHeadModel) and model is not editor.model
    assert model.config.n_embd == editor.model.config.n_embd
    ids = torch.tensor([editor.encode(PROMPTS[0])])
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, ids.shape[1] + 2)
    for n, p in editor.model.named_parameters():
        assert torch.equal(p, before[n]), n  # the base model is left as it was
    assert set(weights_copy) == set(editor.inner_params)
    assert any(not torch.equal(model.get_parameter(n), before[n]) for n in editor.inner_params)
    # keep_original_weight=False: EasyEdit's in-place edit, the base model itself is returned, holding the edit
    _, in_place, copy = editor.edit(PROMPTS[0], TARGETS[0], verbose=False, keep_original_weight=False)
    assert in_place is editor.model
    for n in editor.inner_params:
        assert torch.allclose(editor.model.get_parameter(n), model.get_parameter(n)), n
        assert torch.equal(copy[n], before[n])  # what restores it
    EditedModel.restore(editor.model, copy)
    assert all(torch.equal(p, before[n]) for n, p in editor.model.named_parameters())


def test_sequential_edits_accumulate_and_each_is_measured_after_its_own_edit(editor):
    single, alone, _ = editor.edit(PROMPTS, TARGETS, verbose=False)
    sequential, together, _ = editor.edit(PROMPTS, TARGETS, sequential_edit=True, verbose=False)
    assert sequential[0]["post"] == single[0]["post"]  # the first edit meets the same model either way
    assert [m["pre"] for m in sequential] == [m["pre"] for m in single]  # pre: the unedited model
    base = editor.base()
    patches = base.copy()
    for p, t in zip(PROMPTS, TARGETS):
        request = EditRequest(p, t)
        patches.push(editor.edit_patch(patches, [editor.tokenize(request)], [request]))
    for n in editor.inner_params:
        assert torch.allclose(together.get_parameter(n), patches.weights[n], atol=1e-6), n
        assert not torch.allclose(together.get_parameter(n), alone.get_parameter(n)), n


def test_test_generation_gives_the_generation_entropy_of_the_greedy_continuation(editor):
    metrics, model, _ = editor.edit(PROMPTS[0], TARGETS[0], verbose=False, test_generation=True)
    ids = editor.encode(PROMPTS[0])
    limit = min(easyedit_api.FLUENCY_TOKENS, editor.model.config.n_positions) - len(ids)
    for when, on in (("pre", editor.base()), ("post", EditedModel(model))):
        text = PROMPTS[0] + editor.decode(editor.greedy(on, ids, limit))
        assert metrics[0][when]["fluency"] == {"ngram_entropy": pytest.approx(n_gram_entropy(text))}
    assert "fluency" not in editor.edit(PROMPTS[0], TARGETS[0], verbose=False)[0][0]["post"]


def test_batch_edit_applies_hparams_n_edits_requests_per_update(editor):
    editor.hparams.data.n_edits = 2
    metrics, model, _ = editor.batch_edit(PROMPTS, TARGETS, verbose=False)
    assert [m["case_id"] for m in metrics] == [0, 1, 0]  # counted within each chunk, as EasyEdit does
    assert metrics[0]["time"] == metrics[1]["time"] and set(metrics[0]) == {
        "case_id", "requested_rewrite", "pre", "time", "post"
    }  # fmt: skip
    base = editor.base()
    first = base.copy()
    requests = [EditRequest(p, t) for p, t in zip(PROMPTS[:2], TARGETS[:2])]
    first.push(editor.edit_patch(first, [editor.tokenize(r) for r in requests], requests))
    for i in range(2):
        assert metrics[i]["post"]["rewrite_acc"] == [
            pytest.approx(score(editor, first, PROMPTS[i], TARGETS[i]).accuracy)
        ]
    # the last chunk, alone on the unedited model, is the model returned
    assert metrics[2]["pre"]["rewrite_acc"] == [pytest.approx(score(editor, base, PROMPTS[2], TARGETS[2]).accuracy)]
    last = EditedModel(model)
    assert metrics[2]["post"]["rewrite_acc"] == [pytest.approx(score(editor, last, PROMPTS[2], TARGETS[2]).accuracy)]
    # sequential: the last chunk's pre is measured on the model the first chunk edited
    chained, _, _ = editor.batch_edit(PROMPTS, TARGETS, sequential_edit=True, verbose=False)
    assert chained[2]["pre"]["rewrite_acc"] == [pytest.approx(score(editor, first, PROMPTS[2], TARGETS[2]).accuracy)]


def test_prepared_requests_and_pre_metrics_can_be_given_and_saved(editor, tmp_path):
    pre_file = tmp_path / "pre.json"
    first, _, _ = editor.edit(PROMPTS[:2], TARGETS[:2], rephrase_prompts=["The city is", None], pre_file=str(pre_file))
    assert json.loads(pre_file.read_text()) == [{"pre": m["pre"]} for m in first]
    assert first[1]["requested_rewrite"]["rephrase_prompt"] is None and "rephrase_acc" not in first[1]["post"]
    assert "target_neg" not in first[0]["requested_rewrite"]  # as EasyEdit: only the arguments given
    requests = [m["requested_rewrite"] for m in first]
    pre = [{"pre": {**m["pre"], "rewrite_acc": [0.5]}} for m in first]  # taken as given, not recomputed
    again, _, _ = editor.edit(None, None, requests=requests, pre_edit=pre)
    assert [m["pre"]["rewrite_acc"] for m in again] == [[0.5], [0.5]]
    assert [m["post"] for m in again] == [m["post"] for m in first]


def test_the_summary_averages_as_easyedit_does(capsys):
    metrics = [
        {"pre": {"rewrite_acc": [0.0], "locality": {"n_output": [[1]]}},
         "post": {"rewrite_acc": [1.0], "rephrase_acc": [0.5], "locality": {"n_acc": [1.0, 0.0]},
                  "portability": {"p_acc": [1.0]}}},
        {"pre": {"rewrite_acc": [0.5], "locality": {"n_output": [[1]]}},
         "post": {"rewrite_acc": [0.5], "rephrase_acc": [0.0], "locality": {"n_acc": [1.0]},
                  "portability": {"p_acc": [0.0]}}},
    ]  # fmt: skip
    summary = easyedit_api.summary_metrics(metrics)
    assert summary == {
        "pre": {"rewrite_acc": 0.25},  # no accuracy of locality before the edit
        "post": {"rewrite_acc": 0.75, "rephrase_acc": 0.25, "locality": {"n_acc": 0.75}, "portability": {"p_acc": 0.5}},
    }  # locality: the mean per request (0.5, 1.0), then over requests
    assert capsys.readouterr().out == f"Metrics Summary:  {summary}\n"


def test_subjects_and_unknown_options_are_checked(editor):
    assert EditRequest("Paris is the capital of", "Italy", subject="Paris").subject == "Paris"
    assert EditRequest.from_dict({"prompt": "Paris is in", "target": "Italy", "subject": "Paris"}).subject == "Paris"
    with pytest.raises(EditRequestError, match="'subject' 'Rome' does not occur in the prompt"):
        EditRequest("Paris is the capital of", "Italy", subject="Rome")
    with pytest.raises(EditRequestError, match="'subject' must be a non-empty string"):
        EditRequest("Paris is the capital of", "Italy", subject=" ")
    with pytest.raises(EditRequestError, match="does not occur in the prompt"):
        editor.edit(PROMPTS[0], TARGETS[0], subject="bridge")
    with pytest.raises(TypeError, match="unexpected keyword argument.*keep_orignal_weight"):
        editor.edit(PROMPTS[0], TARGETS[0], keep_orignal_weight=True)
    with pytest.raises(TypeError, match="train_ds="):
        editor.edit(PROMPTS[0], TARGETS[0], train_ds=[])
    with pytest.raises(ValueError, match="eval_metric='ppl'"):
        editor.edit(PROMPTS[0], TARGETS[0], eval_metric="ppl")
    with pytest.raises(ValueError, match="target_new: 1 values for 2 prompts"):
        editor.edit(PROMPTS[:2], TARGETS[:1])


# -- ROME's case files -------------------------------------------------------------------------------------------
def rome_summaries(dir_name: Path) -> dict:
    """What ROME's experiments/summarize.py computes from a directory of runs, restated: per run directory, its
    case_<id>.json files in case order, the success rate and magnitude of each prompt kind before and after, the
    generation figures, and the score S (harmonic mean of the three success rates), in percent."""
    out = {}
    for run_dir in dir_name.iterdir():
        files = sorted(run_dir.glob("case_*.json"), key=lambda x: int(str(x).split("_")[-1].split(".")[0]))
        sums = defaultdict(list)
        for case_file in files:
            data = json.loads(case_file.read_text())
            sums["time"].append(data["time"])
            for prefix in ("pre", "post"):
                for key, wins in (("rewrite", True), ("paraphrase", True), ("neighborhood", False)):
                    probs = data[prefix].get(f"{key}_prompts_probs")
                    if probs is None:
                        continue
                    new, true = [x["target_new"] for x in probs], [x["target_true"] for x in probs]
                    won = [(t > n) if wins else (t < n) for n, t in zip(new, true)]
                    diff = [math.exp(-n) - math.exp(-t) for n, t in zip(new, true)]
                    sums[f"{prefix}_{key}_success"].append(mean(won))
                    sums[f"{prefix}_{key}_diff"].append(mean(d if wins else -d for d in diff))
                for key in ("ngram_entropy", "reference_score", "essence_score"):
                    if key in data[prefix]:
                        sums[f"{prefix}_{key}"].append(data[prefix][key])
        if sums:
            summary = {k: 100 * mean(v) for k, v in sums.items() if k != "time"}
            for prefix in ("pre", "post"):
                parts = [summary[f"{prefix}_{k}_success"] for k in ("rewrite", "paraphrase", "neighborhood")]
                summary[f"{prefix}_score"] = harmonic_mean(parts) if min(parts) > 0 else 0.0
            out[run_dir.name] = dict(summary, num_cases=len(files))
    return out


def test_eval_layout_rome_writes_case_files_rome_summariser_reads(archive, tmp_path):
    editor = Editor.from_archive(archive)
    out = tmp_path / "rome"
    plan = [("single", 1), ("batched", 3)]
    result = fact_eval.evaluate_dataset(
        editor, plan, path=str(COUNTERFACT), split="all", n=3, generation=True, gen_tokens=4, out_dir=str(out),
        layout="rome",
    )  # fmt: skip
    ids = sorted(c["case_id"] for c in read_counterfact(COUNTERFACT))
    assert sorted(p.name for p in out.iterdir()) == ["batched-3", "single", "summary.md"]
    case = json.loads((out / "single" / f"case_{ids[0]}.json").read_text())
    assert set(case) == {"case_id", "requested_rewrite", "time", "pre", "post"}
    assert set(case["requested_rewrite"]["target_new"]) == {"str"} and "{}" in case["requested_rewrite"]["prompt"]
    summaries = rome_summaries(out)
    for run in result["runs"]:
        ours, rome = run["summary"], summaries["single" if run["mode"] == "single" else "batched-3"]
        assert rome["num_cases"] == len(ids)
        for when in ("pre", "post"):
            for theirs, key in (
                ("rewrite", "efficacy"),
                ("paraphrase", "paraphrase"),
                ("neighborhood", "neighborhood"),
            ):
                assert rome[f"{when}_{theirs}_success"] == pytest.approx(100 * ours[f"{when}_{key}_score"])
                assert rome[f"{when}_{theirs}_diff"] == pytest.approx(100 * ours[f"{when}_{key}_magnitude"])
            assert rome[f"{when}_score"] == pytest.approx(100 * ours[f"{when}_score"])
            assert rome[f"{when}_ngram_entropy"] == pytest.approx(100 * ours[f"{when}_ngram_entropy"])


def test_the_eval_command_takes_layout_rome(archive, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["eval", "--archive", archive, "--path", str(COUNTERFACT), "--split", "all", "--n", "2"]
    assert edit.main(args + ["--out", str(out), "--layout", "rome"]) == 0
    names = {f"case_{c['case_id']}.json" for c in read_counterfact(COUNTERFACT)}
    files = [p.name for p in (out / "single").iterdir()]
    assert len(files) == 2 and set(files) <= names
    assert edit.main(args + ["--layout", "rome"]) == 2
    assert "--layout rome says how --out's files are laid out" in capsys.readouterr().err
