"""CounterFact-format data (data_classes/counterfact.py) and the field's metrics (fact_eval.py), with the
`python -m edit eval` command and the counterfact experiment."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_edit
import torch
from conftest import make_config
from omegaconf import OmegaConf
from test_baselines import SMALL_EFK
from test_run import INNER, ROOT

import data_classes.base
import fact_eval
import fact_metrics
import fact_report
from algs import editor_class
from config_schema import DataConfig
from data_classes import DataError
from data_classes.counterfact import (
    CounterFactDataset,
    build_embedded,
    embedded_params,
    load_split,
    read_counterfact,
    split_by_subject,
)
from edit import Editor
from editable_model import logits_of
from evaluation import train_and_evaluate
from losses import IGNORE
from trainer import EditTrainer

FIXTURE = Path(__file__).parent / "fixtures" / "counterfact_sample.json"
tokenizer = test_edit.tokenizer  # the real GPT-2 vocabulary (a module fixture)
workspace, trained_run, edit_cli = test_edit.workspace, test_edit.trained_run, test_edit.edit_cli
pytestmark = test_edit.pytestmark


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), kw)


# -- reading ---------------------------------------------------------------------------------------------------
def test_the_rome_format_is_read_with_its_fields():
    records = read_counterfact(FIXTURE)
    assert [r["case_id"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["prompt"].format(first["subject"]) == "The mother tongue of Danielle Darrieux is"
    assert (first["target_new"], first["target_true"], first["relation_id"]) == ("English", "French", "P103")
    assert len(first["paraphrase_prompts"]) == 2 and len(first["neighborhood_prompts"]) == 3
    assert first["reference_texts"] == [] and records[2]["reference_texts"][0].startswith("Sweden")


def test_json_lines_are_read_too(tmp_path):
    path = tmp_path / "cf.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in json.loads(FIXTURE.read_text())) + "\n")
    assert [r["subject"] for r in read_counterfact(path)] == [r["subject"] for r in read_counterfact(FIXTURE)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("case_id"), "record 1: 'case_id' must be an integer"),
        (lambda r: r["requested_rewrite"].update(prompt="no slot"), "(case_id 1): 'requested_rewrite.prompt' must"),
        (lambda r: r["requested_rewrite"].pop("target_new"), "'requested_rewrite.target_new.str' must be"),
        (lambda r: r.update(neighborhood_prompts="one"), "'neighborhood_prompts' must be a list of strings"),
        (lambda r: r.update(case_id=0), "case_id 0 appears twice"),
    ],
)
def test_a_bad_record_is_refused_naming_the_file_record_and_field(tmp_path, change, message):
    records = json.loads(FIXTURE.read_text())
    change(records[1])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError) as e:
        read_counterfact(path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_a_file_that_is_not_json_or_missing_says_so(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_counterfact(path)
    with pytest.raises(DataError, match="no such file"):
        read_counterfact(tmp_path / "absent.json")


def test_a_file_is_split_by_subject():
    records = read_counterfact(FIXTURE)
    splits = split_by_subject(records, 0.34, seed=0)
    assert len(splits["validation"]) == 1 and len(splits["train"]) == 2
    assert not {r["subject"] for r in splits["train"]} & {r["subject"] for r in splits["validation"]}


# -- the embedded set ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    return build_embedded(embedded_params(data_cfg(), seed=0))


def test_the_embedded_set_is_counterfact_shaped_and_split_by_country(embedded):
    train, val = embedded["train"], embedded["validation"]
    assert len(train) > 300 and len(val) > 40
    assert not {r["requested_rewrite"]["subject"] for r in train} & {r["requested_rewrite"]["subject"] for r in val}
    for r in train[:50] + val:
        rw = r["requested_rewrite"]
        assert "{}" in rw["prompt"] and rw["target_new"]["str"] != rw["target_true"]["str"]
        assert all(rw["subject"] in p for p in r["paraphrase_prompts"]) and len(r["paraphrase_prompts"]) >= 2
        assert all(p.count(".") >= 1 for p in r["paraphrase_prompts"])  # behind an unrelated sentence
        assert r["neighborhood_prompts"] and rw["prompt"].format(rw["subject"]) not in r["neighborhood_prompts"]
        assert all(not p.endswith(rw["target_true"]["str"]) for p in r["neighborhood_prompts"])
    assert build_embedded(embedded_params(data_cfg(), seed=0)) == embedded  # deterministic


def test_the_embedded_neighbors_share_the_true_object(embedded):
    from data_classes.facts import load_facts

    truth = {(f.country, f.relation): f.obj for f in load_facts()}
    for r in embedded["validation"]:
        rw = r["requested_rewrite"]
        prefix, _, suffix = rw["prompt"].partition("{}")
        for p in r["neighborhood_prompts"]:
            country = p[len(prefix) : len(p) - len(suffix)]
            assert truth[(country, rw["relation_id"])] == rw["target_true"]["str"], (p, rw)


# -- training batches ------------------------------------------------------------------------------------------
def test_training_batches_edit_toward_the_new_target_and_keep_the_neighbors(tokenizer, tmp_path):
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    cfg = data_cfg(path=str(FIXTURE), val_fraction=0.34)
    ds = CounterFactDataset(tokenizer, cfg, "train", seed=0, cache_dir=str(tmp_path), model=model)
    batch = next(ds.edit_generator(3))
    raw = batch["raw"]
    case = next(c for c in ds.cases if c["prompt"].format(c["subject"]) == raw["question"][0])
    assert raw["target"] == [case["target_new"]] and raw["rephrase"][0] in case["paraphrase_prompts"]
    assert set(raw["loc"]) <= set(case["neighborhood_prompts"]) and set(raw["loc_ans"]) == {case["target_true"]}
    inner = batch["edit_inner"]
    target = tokenizer.decode(inner["input_ids"][0][inner["labels"][0] != IGNORE])
    assert target.strip() == case["target_new"]
    other = CounterFactDataset(tokenizer, data_cfg(path=str(FIXTURE), val_fraction=0.34, neighborhood_locality=False),
                               "train", seed=0, cache_dir=str(tmp_path), model=model)  # fmt: skip
    loc = next(other.edit_generator(3))["raw"]["loc"]
    assert not set(loc) & set(case["neighborhood_prompts"])  # other cases' rewrite prompts instead


# -- the metrics, on hand-made cases ---------------------------------------------------------------------------
def test_rewrite_equivalence_mixes_the_rewrite_prompt_into_the_edit_loss(tokenizer, tmp_path):
    model = test_edit.tiny_model("gpt2", len(tokenizer))

    def equivalence_inputs(p):
        cfg = data_cfg(path=str(FIXTURE), val_fraction=0.34, rewrite_equivalence=p)
        ds = CounterFactDataset(tokenizer, cfg, "train", seed=0, cache_dir=str(tmp_path), model=model)
        gen = ds.edit_generator(3)
        out = []
        for _ in range(40):
            raw = next(gen)["raw"]
            out.append(raw["rephrase"][0] == raw["question"][0])
            case = next(c for c in ds.cases if c["prompt"].format(c["subject"]) == raw["question"][0])
            assert raw["rephrase"][0] in case["paraphrase_prompts"] + [raw["question"][0]]
        return out

    assert not any(equivalence_inputs(0.0))  # MEND's recipe: the paraphrase only
    assert all(equivalence_inputs(1.0))
    mixed = equivalence_inputs(0.5)
    assert 8 <= sum(mixed) <= 32  # drawn anew per batch


def test_n_gram_entropy_is_romes_weighted_mean():
    # "a b a b": bigrams ab, ba, ab (H = 0.918 bits), trigrams aba, bab (H = 1 bit)
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert fact_metrics.n_gram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert fact_metrics.n_gram_entropy("the the the the the") == 0.0  # one n-gram only


def test_tfidf_similarity_is_the_cosine_of_smoothed_tfidf_vectors():
    tfidf = fact_metrics.TfIdf(["apple banana", "apple cherry", "durian"])
    assert tfidf.similarity("apple banana", "apple banana") == pytest.approx(1.0)
    assert tfidf.similarity("banana", "cherry durian") == 0.0
    # by hand: idf(apple) = ln(4/3) + 1, idf(banana) = idf(cherry) = ln(4/2) + 1
    ia, ib = math.log(4 / 3) + 1, math.log(2) + 1
    expected = ia * ia / (ia * ia + ib * ib)
    assert tfidf.similarity("apple banana", "apple cherry") == pytest.approx(expected)


def test_case_summary_and_score_follow_the_papers_definitions():
    def probs(pairs):
        return [{"target_new": n, "target_true": t} for n, t in pairs]

    pre = {
        "rewrite_prompts_probs": probs([(3.0, 1.0)]),
        "paraphrase_prompts_probs": probs([(3.0, 1.0), (2.5, 1.5)]),
        "neighborhood_prompts_probs": probs([(3.0, 1.0)]),
        "rewrite_acc": [0.0],
        "rephrase_acc": [0.0, 0.5],
        "neighborhood_argmax": [[5, 6]],
    }
    post = {
        "rewrite_prompts_probs": probs([(0.5, 2.0)]),  # the new target now likelier
        "paraphrase_prompts_probs": probs([(0.5, 2.0), (2.0, 1.0)]),  # one of two
        "neighborhood_prompts_probs": probs([(0.5, 2.0)]),  # the neighbour lost its true answer
        "rewrite_acc": [1.0],
        "rephrase_acc": [1.0, 0.0],
        "neighborhood_argmax": [[5, 7]],
    }
    s = fact_metrics.case_summary(pre, post)
    assert (s["pre_efficacy_score"], s["post_efficacy_score"]) == (0.0, 1.0)
    assert s["post_efficacy_magnitude"] == pytest.approx(math.exp(-0.5) - math.exp(-2.0))
    assert s["post_paraphrase_score"] == 0.5 and s["post_neighborhood_score"] == 0.0
    assert s["post_neighborhood_magnitude"] == pytest.approx(math.exp(-2.0) - math.exp(-0.5))
    assert s["post_rephrase_acc"] == 0.5 and s["post_locality"] == 0.5
    good = dict(s, post_neighborhood_score=1.0)
    total = fact_metrics.summarize([{"summary": s}, {"summary": good}])
    assert total["post_neighborhood_score"] == 0.5
    assert total["post_score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.5))  # harmonic mean of ES, PS, NS
    assert total["pre_score"] == 0.0 and total["n_cases"] == 2


def test_the_editors_score_gives_the_log_prob_mean_token_nll_and_accuracy(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    base = editor.base()
    rows = [editor.tokenize(test_edit.REQUESTS[0]).__dict__[k] for k in ("prompt", "target")]
    prompt, target = rows
    longer = editor.encode("The old museum of the river city and its long winter festival")
    assert len(longer) > len(prompt)
    got, _ = editor.score(base, [(prompt, target), (longer, target)])  # the row measured is right-padded
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(base(ids, torch.ones_like(ids))[0].float(), -1)
    lp = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target)]
    assert got.log_prob == pytest.approx(sum(lp), rel=1e-5)
    assert got.nll == pytest.approx(-sum(lp) / len(lp), rel=1e-5)
    argmax = [int(logp[len(prompt) - 1 + j].argmax()) for j in range(len(target))]
    assert got.argmax == argmax
    assert got.accuracy == pytest.approx(sum(a == t for a, t in zip(argmax, target)) / len(target))
    assert got.correct == (argmax == target)


# -- evaluating an editor --------------------------------------------------------------------------------------
def test_evaluate_in_every_mode_leaves_the_base_model_and_measures_each_case(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    before = {n: p.clone() for n, p in editor.model.named_parameters()}
    cases = read_counterfact(FIXTURE)
    runs = [
        fact_eval.evaluate(editor, cases, "single"),
        fact_eval.evaluate(editor, cases, "batched", n_edits=3),
        fact_eval.evaluate(editor, cases, "sequential", n_edits=3, generation=True, gen_tokens=4),
    ]
    for n, p in editor.model.named_parameters():
        assert torch.equal(p, before[n]), n
    for run in runs:
        assert [c["case_id"] for c in run["cases"]] == [0, 1, 2]
        for c in run["cases"]:
            assert set(c) >= {"case_id", "requested_rewrite", "pre", "post", "summary", "time"}
            assert len(c["post"]["paraphrase_prompts_probs"]) == len(cases[c["case_id"]]["paraphrase_prompts"])
        assert run["summary"]["n_cases"] == 3
        wins = [[p["target_new"] < p["target_true"] for p in c["post"]["rewrite_prompts_probs"]] for c in run["cases"]]
        assert run["summary"]["post_efficacy_score"] == pytest.approx(sum(sum(w) / len(w) for w in wins) / 3)
    assert runs[0]["cases"][0]["pre"] == runs[1]["cases"][0]["pre"]  # "pre" is the unedited model in every mode
    # a visible edit: the new target's probability rises on the rewrite prompt
    single = runs[0]["summary"]
    assert single["post_efficacy_magnitude"] > single["pre_efficacy_magnitude"]
    gen = runs[2]["cases"][2]["post"]
    assert len(gen["text"]) == 1 and gen["text"][0].startswith(cases[2]["generation_prompts"][0])
    assert gen["ngram_entropy"] == pytest.approx(fact_metrics.n_gram_entropy(gen["text"][0]))
    # consistency: this case's text against its own reference texts, idf from every case's references
    tfidf = fact_metrics.TfIdf([t for c in cases for t in c["reference_texts"]])
    own = tfidf.similarity(gen["text"][0], " ".join(cases[2]["reference_texts"]))
    assert gen["reference_score"] == pytest.approx(own) and own > 0
    table = fact_report.summary_table(runs)
    assert table.splitlines()[2].startswith("| before |") and "after, sequential x3" in table


def test_generation_of_many_cases_at_once_gives_each_case_its_own_texts(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    cases = read_counterfact(FIXTURE)
    cases[1] = dict(cases[1], generation_prompts=cases[1]["generation_prompts"] + ["A much longer prompt about it"])
    tfidf = fact_metrics.TfIdf([t for c in cases for t in c["reference_texts"]])
    together = fact_metrics.generation_metrics(editor, editor.base(), cases, tfidf, 6, chunk=3)
    alone = [fact_metrics.generation_metrics(editor, editor.base(), [c], tfidf, 6)[0] for c in cases]
    assert together == alone
    assert [len(r["text"]) for r in together] == [len(c["generation_prompts"]) for c in cases]
    assert all(r["text"][0].startswith(c["generation_prompts"][0]) for r, c in zip(together, cases))


def test_consistency_does_not_depend_on_which_cases_are_evaluated_given_the_corpus(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    cases = read_counterfact(FIXTURE)
    cases[0] = dict(cases[0], reference_texts=["Helsinki is a city.", "A country in Northern Europe, with lakes."])
    corpus = [t for c in cases for t in c["reference_texts"]]

    def consistency(subset, corpus):
        run = fact_eval.evaluate(editor, subset, "single", generation=True, gen_tokens=4, reference_corpus=corpus)
        return run["cases"][-1]["post"]["reference_score"]  # the last case: cases[2]

    assert consistency(cases[2:], corpus) == consistency(cases, corpus)
    assert consistency(cases[2:], None) != consistency(cases, None)  # idf fitted on the evaluated cases alone


def test_shared_pre_edit_metrics_give_the_runs_computed_alone(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    cases = read_counterfact(FIXTURE)
    prepared = fact_eval.PreparedCases(editor, cases)
    assert fact_eval.pre_edit_metrics(editor, cases) == prepared.pre
    for mode, n in (("single", 1), ("batched", 2)):
        alone = fact_eval.evaluate(editor, cases, mode, n)
        shared = fact_eval.evaluate(editor, cases, mode, n, prepared=prepared)
        timing = ("edit_seconds", "edits_per_second", "eval_seconds")
        assert {k: v for k, v in alone["summary"].items() if k not in timing} == {
            k: v for k, v in shared["summary"].items() if k not in timing
        }
        assert [c["pre"] for c in alone["cases"]] == prepared.pre
    with pytest.raises(ValueError, match="3 cases for 2 cases"):
        fact_eval.evaluate(editor, cases[:2], "single", prepared=prepared)


def test_the_eval_command_writes_one_report_per_group_size_and_a_plot(trained_run, tmp_path):
    out, plot = tmp_path / "eval", tmp_path / "curve.png"
    proc = edit_cli(
        "eval", "--archive", trained_run, "--path", FIXTURE, "--split", "all", "--n", 3,
        "--mode", "batched,sequential", "--n-edits", "1,3", "--out", out, "--plot", plot,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 cases" in proc.stdout and "after, sequential x3" in proc.stdout and "after, batched x3" in proc.stdout
    report = json.loads((out / "sequential-3.json").read_text())
    assert report["n_edits"] == 3 and len(report["cases"]) == 3 and "post" in report["cases"][0]
    assert report["mode"] == "sequential" and json.loads((out / "batched-3.json").read_text())["mode"] == "batched"
    assert (out / "sequential-1.json").is_file() and (out / "summary.md").is_file() and plot.stat().st_size > 1000
    proc = edit_cli("eval", "--archive", trained_run, "--mode", "batched,serial")
    assert proc.returncode == 2 and "--mode 'batched,serial': choose from single, batched, sequential" in proc.stderr
    proc = edit_cli("eval", "--archive", trained_run, "--path", tmp_path / "absent.json")
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_the_generation_benchmark_times_three_ways_that_give_the_same_tokens(trained_run, tmp_path):
    from benchmarks import generation_speed

    out = tmp_path / "gen_speed.json"
    args = ["--archive", str(trained_run), "--path", str(FIXTURE), "--split", "all", "--cases", "3", "--tokens", "4"]
    assert generation_speed.main(args + ["--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == sum(len(c["generation_prompts"]) for c in read_counterfact(FIXTURE))
    assert result["same_tokens"] == {"one_at_a_time": True, "per_case": True, "all_cases": True}
    assert set(result["seconds"]) == set(result["same_tokens"]) and min(result["seconds"].values()) > 0


def test_the_embedded_validation_cases_load_for_an_editor(tmp_path):
    cases, source = load_split(data_cfg(max_countries=40), "validation", seed=0, cache_dir=str(tmp_path))
    assert cases and source.endswith("validation.json") and Path(source).is_file()
    again, _ = load_split(data_cfg(max_countries=40), "validation", seed=0, cache_dir=str(tmp_path))
    assert again == cases


def test_the_counterfact_experiment_trains_and_its_editor_evaluates(workspace, tmp_path):
    run_dir = tmp_path / "cf-run"
    cmd = [
        sys.executable, "-m", "run", "+alg=mend", "+experiment=counterfact", "+model=distilgpt2",
        f"model.name={workspace['model']}", f"model.tokenizer_name={workspace['model']}", f"model.inner_params={INNER}",
        "data.max_countries=40", f"cache_dir={workspace['cache']}", "device=cpu", "wandb.enabled=false", "mend.rank=8",
        "max_iters=4", "val_interval=4", "val_steps=2", "eval.final_steps=2", "eval.compare_untrained=false",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 4 and "edit/acc_val" in results["results"]
    proc = edit_cli("eval", "--archive", run_dir, "--n", 2, "--cache-dir", workspace["cache"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 cases (counterfact, embedded, validation)" in proc.stdout


def _target_log_prob(model, batch: dict) -> float:
    """log p(target | prompt) per target token over a batch's edits, computed here from the logits."""
    with torch.no_grad():
        logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return ((lp * mask).sum() / mask.sum()).item()


# The rise of the target's log-prob on the equivalence inputs that each editor's edit gives after the two steps
# (deterministic: the same with any torch seed). Measured: MEND 0.047 (0.013 with the update's sign flipped, which
# the two steps of its step sizes half undo), ENN 0.016 (-0.011 flipped), FT 0.043 (100 steps without reaching the
# target; -0.043 flipped); an unedited model gives exactly 0. EFK is not trained by two steps (its updates start
# near zero and the first two steps do not point them anywhere yet: -0.0014), so for it only that the edit moves
# the figure at all.
RISE = {"mend": 0.03, "enn": 0.005, "ft": 0.02, "efk": None}


@pytest.mark.parametrize("alg", ["mend", "efk", "enn", "ft"])
def test_every_editor_trains_and_evaluates_on_the_counterfact_set(alg, tokenizer, tmp_path):
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    settings = {
        "alg": alg, "task": "counterfact", "data.max_countries": 40, "max_iters": 2, "val_interval": 2,
        "val_steps": 2, "log_interval": 1, "accumulate_bs": 1, "save": False, "eval.final_steps": 2,
        "eval.compare_untrained": False, "train_base": alg == "enn", "eval_only": alg == "ft",
        **(SMALL_EFK if alg == "efk" else {}),
    }  # fmt: skip
    cfg = make_config("gpt2", **settings)
    sets = [CounterFactDataset(tokenizer, cfg.data, s, 0, str(tmp_path), model=model) for s in ("train", "validation")]
    cls = editor_class(alg)
    trainer = EditTrainer(lambda: cls(model, cfg), cfg, *sets, str(tmp_path / "run"))
    report = train_and_evaluate(trainer)
    results = report["results"]
    assert results["eval_time/n_edits"] == 2 and report["train"]["steps"] == (0 if alg == "ft" else 2)
    # the reported figures, recomputed from the logits of the final editor on the same two validation edits
    editor = trainer.editor
    editor.eval()
    pre, post = [], []
    for batch in sets[1].edit_generator(cfg.val_batch_size, n=2):
        pre.append(_target_log_prob(editor, batch["edit_outer"]))
        edited, _ = editor.edit(batch["edit_inner"], batch.get("cond"))
        post.append(_target_log_prob(edited, batch["edit_outer"]))
    assert results["edit/log_prob_pre_val"] == pytest.approx(sum(pre) / 2, abs=1e-5)
    assert results["edit/log_prob_val"] == pytest.approx(sum(post) / 2, abs=1e-5)
    rise = results["edit/log_prob_val"] - results["edit/log_prob_pre_val"]
    if RISE[alg] is None:
        assert abs(rise) > 1e-4, results
    else:
        assert rise > RISE[alg], results


def test_a_fine_tuning_run_is_an_archive_the_eval_command_takes(tokenizer, tmp_path):
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    settings = {
        "alg": "ft", "task": "counterfact", "data.max_countries": 40, "val_steps": 2, "eval.final_steps": 2,
        "eval.compare_untrained": False, "eval_only": True, "ft.lr": 1e-2,
    }  # fmt: skip
    cfg = make_config("gpt2", **settings)
    sets = [CounterFactDataset(tokenizer, cfg.data, s, 0, str(tmp_path), model=model) for s in ("train", "validation")]
    run_dir = tmp_path / "run"
    train_and_evaluate(EditTrainer(lambda: editor_class("ft")(model, cfg), cfg, *sets, str(run_dir)))
    editor = Editor.from_archive(str(run_dir), model=model, tokenizer=tokenizer)
    assert editor.config.alg == "ft" and editor.config.ft.lr == 1e-2
    run = fact_eval.evaluate(editor, read_counterfact(FIXTURE)[:1], "single")
    summary = run["summary"]
    assert summary["post_efficacy_magnitude"] > summary["pre_efficacy_magnitude"]  # the fine-tuning edit is applied


def test_counterfact_records_load_from_a_hub_dataset_id_or_say_what_to_do_offline(monkeypatch):
    from test_qa import fake_datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the stand-in plays a dataset in the local cache; no probe of the hub
    rows = json.loads(FIXTURE.read_text())
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"train": rows}))
    cfg = data_cfg(path="hf:someone/counterfact", val_fraction=0.34)
    train, source = load_split(cfg, "train", seed=0, cache_dir="unused")
    val, _ = load_split(cfg, "validation", seed=0, cache_dir="unused")
    assert source == "hf:someone/counterfact" and len(train) + len(val) == 3
    assert {r["subject"] for r in train}.isdisjoint(r["subject"] for r in val)
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(ConnectionError("hub unreachable")))
    with pytest.raises(DataError, match=r"could not be loaded \(ConnectionError.*Offline, download ROME's counterfact"):
        load_split(cfg, "train", seed=0, cache_dir="unused")


def test_an_unreachable_hub_fails_at_once_and_a_bare_hub_id_is_pointed_to_hf(monkeypatch, tmp_path):
    """Without the hub (and without HF_HUB_OFFLINE) the dataset is not asked for: one line at once, not
    huggingface_hub's 25 s of retries; a data.path that is no file but reads as a hub id says to write hf:<id>."""
    from test_qa import fake_datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(data_classes.base, "offline_mode", lambda: False)
    monkeypatch.setattr(data_classes.base, "hub_unreachable_reason", lambda: "ConnectError: no route to host")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(AssertionError("load_dataset must not be called")))
    cfg = data_cfg(path="hf:someone/counterfact")
    with pytest.raises(DataError) as e:
        load_split(cfg, "train", seed=0, cache_dir="unused")
    assert str(e.value) == (
        "data.path=hf:someone/counterfact: the HuggingFace hub could not be reached (ConnectError: no route to host). "
        "Offline, download ROME's counterfact.json elsewhere and set data.path=<file>, or leave data.path unset "
        "(embedded) (a dataset already in the local datasets cache loads with HF_HUB_OFFLINE=1)."
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no such file.*For the dataset azhx/counterfact on the HuggingFace hub, "
                                        r"write hf:azhx/counterfact\.$"):  # fmt: skip
        load_split(data_cfg(path="azhx/counterfact"), "train", seed=0, cache_dir="unused")
    with pytest.raises(DataError, match=r"no such file") as e:
        load_split(data_cfg(path="data/counterfact.json"), "train", seed=0, cache_dir="unused")
    assert "HuggingFace" not in str(e.value)  # a file name is not taken for a hub id


def test_an_enn_archive_edits_the_base_model_as_enn_trained_it(tokenizer, tmp_path):
    """ENN's train_base changes the base model; python -m edit applies edits to that model, not the original,
    and leaves the caller's model as it was."""
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = {
        "alg": "enn", "task": "counterfact", "data.max_countries": 40, "max_iters": 2, "val_interval": 2,
        "val_steps": 2, "log_interval": 1, "accumulate_bs": 1, "eval.final_steps": 2, "eval.compare_untrained": False,
        "train_base": True, "enn.lr": 1e-2,
    }  # fmt: skip
    cfg = make_config("gpt2", **settings)
    sets = [CounterFactDataset(tokenizer, cfg.data, s, 0, str(tmp_path), model=model) for s in ("train", "validation")]
    run_dir = tmp_path / "run"
    trained = editor_class("enn")(model, cfg)
    train_and_evaluate(EditTrainer(lambda: trained, cfg, *sets, str(run_dir)))
    editor = Editor.from_archive(str(run_dir), model=model, tokenizer=tokenizer)
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p, original[n]), n
    base = editor.base()
    assert base.base is not model
    changed = [n for n, p in base.base.named_parameters() if not torch.equal(p, original[n])]
    assert changed  # the base the edits apply to is ENN's trained one
    x = torch.tensor([editor.encode("Afghanistan is a country in")])
    ones = torch.ones_like(x)
    with torch.no_grad():
        want = editor.alg(input_ids=x, attention_mask=ones)  # ENN's unedited model: its trained base parameters
    torch.testing.assert_close(base(x, ones), logits_of(want), rtol=0, atol=1e-5)
    assert not torch.allclose(base(x, ones), model(input_ids=x, attention_mask=ones).logits, atol=1e-4)
