"""Saving and resuming a long evaluation (eval_progress.py): a run stopped after some updates and continued from its
progress file gives the figures of the run that was never stopped (the editor's statistics restored with the
weights); a progress file of another run is refused; the eval command asks for --resume, continues, and keeps the
runs already finished."""

from __future__ import annotations

import copy
import json
import os
import signal

import pytest
import test_edit
from conftest import make_config, tiny_gpt2
from test_counterfact import FIXTURE

import fact_eval
from algs.ultraedit.editor import UltraEdit
from data_classes.counterfact import read_counterfact
from edit import Editor
from eval_progress import EvaluationStopped, ProgressMismatchError, RunProgress, progress_path, run_identity

pytestmark = test_edit.pytestmark
tokenizer = test_edit.tokenizer  # fixtures
workspace, trained_run, edit_cli = test_edit.workspace, test_edit.trained_run, test_edit.edit_cli
TIMERS = ("edit_seconds", "edits_per_second", "eval_seconds")


def _cases():
    """The fixture's cases and the same facts asked the other way round (6 cases, distinct ids)."""
    cases = read_counterfact(FIXTURE)
    turned = []
    for c in cases:
        t = copy.deepcopy(c)
        t["case_id"] = f"{c['case_id']}-turned"
        t["target_new"], t["target_true"] = c["target_true"], c["target_new"]
        turned.append(t)
    return cases + turned


def _ultraedit(tokenizer):
    """An editor whose lifelong state (running statistics) shapes every update after the first."""
    model = tiny_gpt2(vocab=len(tokenizer))
    cfg = make_config("gpt2", alg="ultraedit", **{"ultraedit.lr": 1e-2})
    return Editor(UltraEdit(model, cfg), tokenizer, cfg, {}, "ultraedit")


def _stop_after(n):
    calls = [0]

    def should_stop():
        calls[0] += 1
        return calls[0] > n

    return should_stop


def _same_figures(got, want):
    assert [c["case_id"] for c in got["cases"]] == [c["case_id"] for c in want["cases"]]
    assert [c["post"] for c in got["cases"]] == [c["post"] for c in want["cases"]]
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMERS}  # noqa: E731
    assert strip(got["summary"]) == strip(want["summary"])


@pytest.mark.parametrize("mode,size,step", [("sequential", 6, 1), ("sequential", 3, 1), ("batched", 2, 1)])
def test_a_run_stopped_and_continued_gives_the_figures_of_one_never_stopped(tokenizer, tmp_path, mode, size, step):
    editor = _ultraedit(tokenizer)
    cases = _cases()
    prepared = fact_eval.PreparedCases(editor, cases)
    whole = fact_eval.evaluate(editor, cases, mode, size, prepared=prepared, edits_per_step=step)
    path = str(tmp_path / "run.progress.safetensors")

    def saved(m, n, st, r):
        return RunProgress(path, run_identity(editor, m, n, st, r, cases), save_seconds=1e9)

    # stopped after the second update (the 2nd edit of a sequential group, or the 2nd group of a batched run)
    with pytest.raises(EvaluationStopped) as stopped:
        fact_eval.evaluate(editor, cases, mode, size, prepared=prepared, saved=saved, should_stop=_stop_after(1))
    assert os.path.exists(path) and stopped.value.done == (2 if mode == "sequential" else 4)
    assert os.stat(path).st_mode & 0o044  # readable beyond its owner, as any output
    meta = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["progress"])
    assert meta["state"]["start"] + meta["state"]["offset"] == stopped.value.done
    resumed = fact_eval.evaluate(editor, cases, mode, size, prepared=prepared, saved=saved)
    _same_figures(resumed, whole)
    if mode == "sequential":
        assert resumed["summary"]["held_when_applied"] == whole["summary"]["held_when_applied"]


def test_a_progress_file_of_another_run_or_model_is_refused(tokenizer, tmp_path):
    editor = _ultraedit(tokenizer)
    cases = _cases()
    path = str(tmp_path / "run.progress.safetensors")
    store = RunProgress(path, run_identity(editor, "sequential", 6, 1, 100, cases))
    model = editor.base()
    name = "transformer.h.0.mlp.c_fc.weight"
    model.weights[name] = model.base.get_parameter(name).detach() + 1.0
    store.save({"start": 0, "offset": 2}, model.weights, {}, model.base_identity)
    other = RunProgress(path, run_identity(editor, "sequential", 6, 2, 100, cases))
    with pytest.raises(ProgressMismatchError, match="edits_per_step is 1"):
        other.load(model.base_identity)
    assert store.load(model.base_identity)["state"]["offset"] == 2
    with pytest.raises(ProgressMismatchError, match="another base model"):
        store.load(lambda names: {n: {"sha256": "0"} for n in names})


def test_the_eval_command_continues_an_interrupted_run_with_resume(trained_run, tmp_path):
    plan = [("batched", 1), ("batched", 3), ("sequential", 1), ("sequential", 3)]  # what the commands run
    args = [
        "--archive",
        trained_run,
        "--path",
        FIXTURE,
        "--split",
        "all",
        "--n",
        3,
        "--paraphrases",
        1,
        "--neighbors",
        2,
    ]
    whole = tmp_path / "whole"
    proc = edit_cli("eval", *args, "--mode", "batched,sequential", "--n-edits", "1,3", "--out", whole)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the same command stopped during its second run (the first finished and written)
    out = tmp_path / "stopped"
    editor = Editor.from_archive(str(trained_run))
    with pytest.raises(EvaluationStopped) as stopped:
        fact_eval.evaluate_dataset(
            editor, plan, path=str(FIXTURE), split="all", n=3, out_dir=str(out), paraphrases=1, neighbors=2,
            should_stop=_stop_after(4),  # asked after each group but a run's last, then after each sequential update
        )  # fmt: skip
    done = ["batched-1.json", "batched-3.json", "sequential-1.json"]
    assert stopped.value.done == 1 and sorted(os.listdir(out)) == done + ["sequential-3.progress.safetensors"]
    again = edit_cli("eval", *args, "--mode", "batched,sequential", "--n-edits", "1,3", "--out", out)
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1
    first = [(out / name).read_text() for name in done]
    proc = edit_cli("eval", *args, "--mode", "batched,sequential", "--n-edits", "1,3", "--out", out, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "continuing sequential-3 after 1 of 3 edits" in proc.stderr and "batched-1 is finished" in proc.stderr
    assert [(out / name).read_text() for name in done] == first  # read, not recomputed
    assert not os.path.exists(progress_path(str(out), "sequential-3"))
    for name in done + ["sequential-3.json"]:
        _same_figures(json.loads((out / name).read_text()), json.loads((whole / name).read_text()))
    table = (out / "summary.md").read_text()
    assert "| after, batched x1 |" in table and "| after, sequential x3 |" in table, table
    other = edit_cli("eval", *args, "--n", 2, "--mode", "batched", "--out", out, "--resume")
    assert other.returncode == 2 and "other cases" in other.stderr


def test_sigterm_lets_the_update_finish_saves_and_exits_143(trained_run, tmp_path, monkeypatch, capsys):
    import edit

    real, updates = Editor.edit_patch, []

    def edit_patch(self, *args, **kwargs):
        updates.append(1)
        if len(updates) == 2:  # a stop asked for during the second update
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "edit_patch", edit_patch)
    out = tmp_path / "out"
    args = ["eval", "--archive", str(trained_run), "--path", str(FIXTURE), "--split", "all", "--n", "3"]
    args += ["--mode", "sequential", "--n-edits", "3", "--out", str(out), "-q"]
    assert edit.main(args) == 128 + signal.SIGTERM
    assert len(updates) == 2  # the update in flight finished; no other began
    assert "stopped after 2 of 3 edits" in capsys.readouterr().err
    assert os.path.exists(progress_path(str(out), "sequential-3"))
    assert edit.main(args + ["--resume"]) == 0
    assert len(updates) == 3 and not os.path.exists(progress_path(str(out), "sequential-3"))
    assert len(json.loads((out / "sequential-3.json").read_text())["cases"]) == 3
