"""The layer sweep of the locate-then-edit editors (benchmarks/layer_sweep.py): a layer whose report exists is read,
not run again; its figures are those of its first --n cases; the table has a row per layer."""

from __future__ import annotations

import json

import pytest

from benchmarks import layer_sweep


def _case(efficacy_win: bool, time: float) -> dict:
    new, true = (0.5, 3.0) if efficacy_win else (3.0, 0.5)
    probs = [{"target_new": new, "target_true": true}]
    record = {
        "rewrite_prompts_probs": probs,
        "paraphrase_prompts_probs": probs,
        "neighborhood_prompts_probs": [{"target_new": 3.0, "target_true": 0.5}],
        "rewrite_acc": [1.0 if efficacy_win else 0.0],
        "rephrase_acc": [],
        "neighborhood_argmax": [[1]],
    }
    case = {"time": time, "pre": record, "post": record}
    case["summary"] = {"post_efficacy_score": float(efficacy_win), "post_neighborhood_score": 1.0}
    return case


def _report(directory, cases):
    directory.mkdir(parents=True)
    (directory / "single.json").write_text(json.dumps({"mode": "single", "n_edits": 1, "cases": cases}))


def test_existing_reports_are_read_over_their_first_n_cases_without_running_anything(tmp_path, monkeypatch):
    _report(tmp_path / "rome_L2_eval", [_case(True, 4.0), _case(True, 6.0), _case(False, 100.0)])
    _report(tmp_path / "rome_L5_eval", [_case(False, 1.0), _case(True, 3.0)])
    monkeypatch.setattr(layer_sweep.subprocess, "run", lambda *a, **k: pytest.fail("ran a layer it had"))
    table = tmp_path / "sweep.md"
    assert layer_sweep.main(["--layers", "2,5", "--n", "2", "--out", str(tmp_path), "--table", str(table)]) == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 2", "| 5"]
    assert rows[0].split(" | ")[1] == "100.0"  # the third case (a failure) is beyond --n 2
    assert rows[1].split(" | ")[1] == "50.0"
    assert rows[0].rstrip(" |").split(" | ")[-1] == "6.0"  # median of the first two edits' times (upper)


def test_a_missing_layer_is_run_with_its_layer_setting(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if "eval" in command:
            _report(tmp_path / "memit_L7_eval", [_case(True, 2.0)])

    monkeypatch.setattr(layer_sweep.subprocess, "run", fake_run)
    layer_sweep.main(["--alg", "memit", "--layers", "7", "--n", "1", "--out", str(tmp_path)])
    assert "memit.layers=[7]" in calls[0] and "+alg=memit" in calls[0]
    assert calls[1][calls[1].index("--archive") + 1] == str(tmp_path / "memit_L7")
