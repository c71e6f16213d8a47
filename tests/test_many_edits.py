"""Evaluating many edits: the row scorer (scoring.py: shared prompts, replayed blocks, the output layer on the read
positions) against the scores of each row alone, the greedy check, updates of several edits in a sequential run,
retention, each group starting from the editor as loaded, and the eval command's options."""

from __future__ import annotations

import json
import logging

import pytest
import test_edit
import torch
from conftest import make_config, tiny_gpt2
from test_counterfact import FIXTURE

import fact_eval
from algs.ultraedit.editor import UltraEdit
from data_classes.counterfact import read_counterfact
from edit import Editor, EditRequest
from fact_metrics import case_rows
from scoring import RowScorer

pytestmark = test_edit.pytestmark
tokenizer = test_edit.tokenizer  # fixtures
workspace, trained_run, edit_cli = test_edit.workspace, test_edit.trained_run, test_edit.edit_cli


def _rows(editor):
    """The fixture cases' rows, plus repeated rows and targets that share their first tokens."""
    rows = [r for c in read_counterfact(FIXTURE) for r in case_rows(editor, c)[0]]
    prompt = editor.encode("The old museum of the river city is")
    for target in ("castle garden", "castle", "castle harbour", "the village"):
        rows.append((prompt, editor.encode(" " + target)))
    return rows + rows[:5]


def _same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.log_prob == pytest.approx(w.log_prob, rel=1e-4, abs=1e-5)
        assert g.nll == pytest.approx(w.nll, rel=1e-4, abs=1e-5)
        assert (g.argmax, g.correct) == (w.argmax, w.correct)
        assert g.accuracy == pytest.approx(w.accuracy)


def _edited(editor):
    request = EditRequest("The river city is", "castle")
    model = editor.base()
    model.push(editor.edit_patch(model, [editor.tokenize(request)], [request]))
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_row_scorer_gives_each_rows_own_scores_on_the_unedited_and_an_edited_model(arch, tokenizer):
    editor = test_edit.editor_with_statistics(arch, tokenizer)
    rows = _rows(editor)
    scorer = RowScorer(editor, rows, batch_tokens=64)  # small batches: several of them, padded
    assert scorer.shared_prompts and scorer.k == 1  # prompts run once; block 0 is replayed
    assert len(scorer.unique) < len(rows) and len(scorer.prompts) < scorer.n_passes < len(scorer.unique)
    _same(scorer.score_base(), editor.score(editor.base(), rows))
    edited = _edited(editor)
    want = editor.score(edited, rows)
    assert [w.log_prob for w in want] != [w.log_prob for w in editor.score(editor.base(), rows)]
    _same(scorer.score(edited), want)
    assert scorer.replayed > 0
    subset = [7, 3, len(rows) - 1]
    _same(scorer.score(edited, subset), [want[i] for i in subset])
    plain = RowScorer(editor, rows, replay=False)
    plain.shared_prompts = False  # every pass whole, no replay: the same scores
    _same(plain.score_base(), editor.score(editor.base(), rows))
    _same(plain.score(edited), want)
    assert plain.replayed == 0


def test_replayed_blocks_that_change_the_logits_are_caught_and_scored_in_full(tokenizer, caplog):
    editor = test_edit.editor_with_statistics("llama", tokenizer)
    rows = _rows(editor)
    scorer = RowScorer(editor, rows)
    scorer.score_base()
    for s in scorer.hidden:  # what a model whose blocks cannot be replayed would give
        scorer.hidden[s] = scorer.hidden[s] * 0.5
    edited = _edited(editor)
    with caplog.at_level(logging.WARNING):
        _same(scorer.score(edited), editor.score(edited, rows))
    assert scorer.k == 0 and "full forward passes" in caplog.text


def test_the_greedy_check_is_what_greedy_decoding_emits(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    edited = _edited(editor)
    prompts = [editor.encode(p) for p in ("The river city is", "A winter festival", "North of the bridge is the")]
    rows = []
    for p in prompts:
        greedy = editor.greedy(edited, p, 3)
        rows += [(p, greedy), (p, greedy[:2] + [(greedy[2] + 1) % len(tokenizer)])]
    scorer = RowScorer(editor, rows)
    scorer.score_base()
    got = [s.correct for s in scorer.score(edited)]
    assert got == [True, False] * len(prompts)
    assert [editor.greedy(edited, p, len(t)) == list(t) for p, t in rows] == got


def _spy_updates(editor, monkeypatch):
    sizes = []
    real = Editor.edit_patch

    def edit_patch(self, current, toks, requests=()):
        sizes.append(len(toks))
        return real(self, current, toks, requests)

    monkeypatch.setattr(Editor, "edit_patch", edit_patch)
    return sizes


def test_a_sequential_group_is_applied_in_updates_of_edits_per_step_with_retention(tokenizer, monkeypatch):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    cases = read_counterfact(FIXTURE)
    prepared = fact_eval.PreparedCases(editor, cases)
    sizes = _spy_updates(editor, monkeypatch)
    checks = []  # (patches applied when the watched edits were checked, the cases, whether each held)
    real_holds = prepared.rewrite_holds

    def rewrite_holds(model, watched):
        held = real_holds(model, watched)
        checks.append((len(model.patches), list(watched), held))
        return held

    monkeypatch.setattr(prepared, "rewrite_holds", rewrite_holds)
    run = fact_eval.evaluate(editor, cases, "sequential", 3, prepared=prepared, edits_per_step=2, retention=2)
    assert sizes == [2, 1] and run["edits_per_step"] == 2
    s = run["summary"]
    assert s["retention_edits"] == 2  # the first two edits of the group
    ends = [c["summary"]["post_efficacy_score"] for c in run["cases"][:2]]
    assert s["held_at_end"] == sum(ends) / 2
    # the first two edits were checked once, right after their own update (one patch), and not again
    assert [(n, w) for n, w, _ in checks] == [(1, [0, 1])]
    held = checks[0][2]
    assert s["held_when_applied"] == sum(held) / 2
    kept = [end == 1.0 for h, end in zip(held, ends) if h]
    assert s["retained"] == (sum(kept) / len(kept) if kept else None)
    assert s["edits_per_second"] == pytest.approx(3 / s["edit_seconds"])
    assert s["neighborhood_share"] == pytest.approx(s["post_neighborhood_score"] / s["pre_neighborhood_score"])
    assert "post_generative" in s and "post_generative_paraphrase" in s
    sizes.clear()
    fact_eval.evaluate(editor, cases, "batched", 3, prepared=prepared, edits_per_step=2)
    assert sizes == [3]  # batched: one update per group whatever edits_per_step says
    sizes.clear()
    one = fact_eval.evaluate(editor, cases, "sequential", 3, prepared=prepared)
    assert sizes == [1, 1, 1] and "held_when_applied" in one["summary"]


def test_each_group_starts_from_the_editor_as_loaded(tokenizer, monkeypatch):
    model = tiny_gpt2(vocab=len(tokenizer))
    cfg = make_config("gpt2", alg="ultraedit", **{"ultraedit.lr": 1e-2})
    editor = Editor(UltraEdit(model, cfg), tokenizer, cfg, {}, "ultraedit")
    cases = read_counterfact(FIXTURE)

    def last_case(subset):
        return fact_eval.evaluate(editor, subset, "batched", 1)["cases"][-1]["post"]

    alone = last_case(cases[2:])
    assert last_case(cases) == alone  # the statistics of the first two groups are forgotten
    monkeypatch.setattr(Editor, "start_sequence", lambda self: None)
    assert last_case(cases) != alone  # which is what start_sequence does: without it they carry over


def test_the_eval_command_runs_sequential_updates_and_caps_the_cases_per_size(trained_run, tmp_path):
    out = tmp_path / "eval"
    proc = edit_cli(
        "eval", "--archive", trained_run, "--path", FIXTURE, "--split", "all", "--n", 3, "--mode", "sequential",
        "--n-edits", "1,3", "--edits-per-step", 2, "--cases-per-size", 1, "--out", out, "--paraphrases", 1,
        "--neighbors", 2,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sequential x3 (2 per update)" in proc.stdout and "edits/s" in proc.stdout
    one = json.loads((out / "sequential-1.json").read_text())
    assert len(one["cases"]) == 1  # max(1, --cases-per-size 1) cases at one edit per group
    three = json.loads((out / "sequential-3-by-2.json").read_text())
    assert len(three["cases"]) == 3 and three["summary"]["retention_edits"] == 3
    given = {c["case_id"]: c for c in read_counterfact(FIXTURE)}
    for case in three["cases"]:  # the first paraphrase and at most two neighbours of each case
        source = given[case["case_id"]]
        want = [1, min(2, len(source["neighborhood_prompts"]))]
        for when in ("pre", "post"):
            got = [len(case[when][f"{k}_prompts_probs"]) for k in ("paraphrase", "neighborhood")]
            assert got == want
    assert any(len(c["neighborhood_prompts"]) > 2 for c in given.values())  # the cap did cut one
    from benchmarks import many_edits

    table, plot = tmp_path / "many.md", tmp_path / "many.png"
    assert many_edits.main(["--run", f"tiny={out}", "--table", str(table), "--plot", str(plot)]) == 0
    rows = table.read_text().splitlines()
    assert any(r.startswith("| tiny | sequential, 2 per update | 3 (3 cases) |") for r in rows)
    assert sum(r.startswith("| tiny, before") for r in rows) == 2 and plot.stat().st_size > 1000  # 1 and 3 cases
    bad = edit_cli("eval", "--archive", trained_run, "--path", FIXTURE, "--n", 3, "--n-edits", "5", "--mode", "batched")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--n 5" in bad.stderr


def test_validation_edits_each_start_from_the_editors_statistics_and_leave_them(tmp_path):
    from conftest import TINY, SyntheticEdits

    from trainer import EditTrainer

    cfg = make_config("gpt2", alg="ultraedit", eval_only=True, val_steps=4, **{"ultraedit.lr": 1e-2})
    editor = UltraEdit(TINY["gpt2"][0](), cfg)
    trainer = EditTrainer(lambda: editor, cfg, SyntheticEdits(8), SyntheticEdits(8, seed=1), str(tmp_path))
    before = trainer.editor.lifelong_state()
    first = trainer.validate(steps=4)
    assert all(torch.equal(v, before[k]) for k, v in trainer.editor.lifelong_state().items())
    again = trainer.validate(steps=4)
    timing = ("eval_time/elapsed", "time/edit_val")
    assert {k: v for k, v in first.items() if k not in timing} == {k: v for k, v in again.items() if k not in timing}
