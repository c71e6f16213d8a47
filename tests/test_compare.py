"""The editor comparison, ablation and learning-curve scripts end to end, on the tiny GPT-2 workspace of test_run."""

from __future__ import annotations

import csv
import json
import os

import pytest
from test_run import INNER, workspace  # noqa: F401  (the module-scoped CLI workspace fixture)

from benchmarks import ablations, compare_editors, learning_curve, multi_edit_table


def tiny(workspace):  # noqa: F811
    """Hydra overrides that point a run at the tiny GPT-2 workspace."""
    return [
        f"model.name={workspace['model']}",
        f"model.tokenizer_name={workspace['model']}",
        f"model.inner_params={INNER}",
        f"data.path={workspace['data']}",
        f"cache_dir={workspace['cache']}",
        "device=cpu",
        "mend.rank=8",
    ]


def test_comparison_writes_the_table_and_plot_and_skips_finished_runs(
    workspace,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "compare"
    args = [
        "--model=distilgpt2",
        "--steps=2",
        "--val-edits=2",
        "--eval-edits=3",
        "--editors=FT,MEND",
        "--threads=1",
        f"--out={out}",
        "--",
        *tiny(workspace),
        "ft.max_edit_steps=3",
    ]
    compare_editors.main(args)
    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["editor"] for r in rows] == ["MEND", "FT"]  # the paper's order, whatever the order asked for
    mend, ft = rows
    assert mend["training steps"] == "2" and ft["training steps"] == "0"
    for r in rows:
        # each row reports its own run's results.json
        with open(out / r["editor"].lower() / "results.json") as f:
            res = json.load(f)["results"]
        assert float(r["edit success"]) == pytest.approx(res["edit/acc_val"], rel=1e-9, abs=1e-12)
        assert float(r["drawdown"]) == pytest.approx(res["perplexity/drawdown_val"], rel=1e-9)
        assert float(r["median edit time (s)"]) == pytest.approx(res["time/edit_val"], rel=1e-9)
        with open(out / r["editor"].lower() / "results.json") as f:
            assert float(r["peak memory (MB)"]) == json.load(f)["memory"]["peak_rss_mb"]
    md = (out / "comparison.md").read_text()
    assert md.count("\n") == 4 and "| MEND |" in md
    assert os.path.getsize(out / "comparison.png") > 1000

    # a second call with the same settings reuses the finished runs and writes the same table
    capsys.readouterr()
    compare_editors.main(args)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier with the same settings") == 2
    with open(out / "comparison.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_the_comparison_runs_the_papers_editors_unless_others_are_named(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(compare_editors, "run_all", lambda args, names, *rest: asked.append((args, names)))
    compare_editors.main([f"--out={tmp_path}"])
    compare_editors.main([f"--out={tmp_path}", "--editors=MALMEN"])
    assert [names for _, names in asked] == [["MEND", "EFK", "ENN", "FT", "FT+KL"], ["MALMEN"]]
    # MALMEN's run is python -m run +alg=malmen on the same task and budget (test_malmen runs it on gen)
    args = asked[1][0]
    overrides = compare_editors.run_overrides(args, *compare_editors.EDITORS["MALMEN"])
    assert overrides[:3] == ["+alg=malmen", "+experiment=gen", "+model=smollm2"] and "max_iters=250" in overrides
    with pytest.raises(SystemExit):
        compare_editors.main([f"--out={tmp_path}", "--editors=MALMEN,ROME"])  # not a gen editor here


@pytest.mark.slow
def test_ablations_run_each_variant_with_its_overrides_and_reuse_the_comparisons_mend(
    workspace,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "compare"
    common = ["--model=distilgpt2", "--steps=2", "--val-edits=2", "--eval-edits=3", "--threads=1", f"--out={out}"]
    compare_editors.main([*common, "--editors=MEND", "--", *tiny(workspace)])
    capsys.readouterr()
    ablations.main([*common, "--variants=no norm,MEND,only smaller (one_sided)", "--", *tiny(workspace)])
    printed = capsys.readouterr().out
    assert printed.count("finished earlier with the same settings") == 1  # the comparison's MEND run
    with open(out / "ablations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["editor"] for r in rows] == ["MEND", "no norm", "only smaller (one_sided)"]  # the paper's order
    assert [r["paper ES / drawdown"] for r in rows] == [ablations.PAPER_GEN[r["editor"]] for r in rows]  # its own
    configs = {}
    for r in rows:
        with open(out / compare_editors.run_dir_name(r["editor"]) / "results.json") as f:
            report = json.load(f)
        assert float(r["edit success"]) == pytest.approx(report["results"]["edit/acc_val"], rel=1e-9, abs=1e-12)
        configs[r["editor"]] = report["config"]["mend"]
    assert configs["MEND"]["norm"] and configs["MEND"]["combine"]
    assert not configs["no norm"]["norm"] and configs["no norm"]["combine"]
    assert configs["only smaller (one_sided)"]["one_sided"] and not configs["only smaller (one_sided)"]["combine"]
    assert os.path.getsize(out / "ablations.png") > 1000
    with pytest.raises(SystemExit) as info:
        ablations.main([*common, "--variants=no such variant"])
    assert info.value.code == 2
    assert "unknown ['no such variant']" in capsys.readouterr().err


def test_learning_curve_keeps_every_validation_and_plots_it(workspace, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "curve"
    args = ["--model=distilgpt2", "--steps=6", "--val-interval=2", "--val-edits=2", "--eval-edits=2", "--threads=1"]
    learning_curve.main([*args, f"--out={out}", "--", *tiny(workspace)])
    report = json.loads((out / "results.json").read_text())
    validations = report["train"]["validations"]
    assert [v["step"] for v in validations] == [2, 4, 6]
    assert all(v["seconds"] > 0 for v in validations)
    assert [v["seconds"] for v in validations] == sorted(v["seconds"] for v in validations)
    with open(out / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for r, v in zip(rows, validations):
        assert float(r["edit_success"]) == pytest.approx(v["edit/acc_val"], abs=1e-12)
        assert float(r["drawdown"]) == pytest.approx(v["perplexity/drawdown_val"], rel=1e-9)
    # the validation at the best step is the one the best checkpoint was saved with
    best = next(v for v in validations if v["step"] == report["train"]["best_step"])
    assert best["loss/total_edit_val"] == min(v["loss/total_edit_val"] for v in validations)
    assert os.path.getsize(out / "curve.png") > 1000
    printed = capsys.readouterr().out
    assert printed.count("step ") >= 3 and "Wrote" in printed

    # a finished run is plotted again without training
    (out / "curve.png").unlink()
    learning_curve.main([f"--from-run={out}"])
    assert os.path.getsize(out / "curve.png") > 1000
    with pytest.raises(SystemExit) as info:
        learning_curve.main([f"--from-run={tmp_path}"])
    assert info.value.code == 2 and "no results.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "task, line",
    [
        ("gen", "| MEND | 0.50 | 0.800 | 28.00 | 28.80 | 0.125 | 2049 | 4 | 1.5 | 0.9 / 0.1 |"),
        ("qa", "| MEND | 0.50 | 0.010 | 0.300 | 0.290 | 0.125 | 2049 | 4 | 1.5 | 0.9 / 0.1 |"),
        ("fc", "| MEND | 0.50 | 0.010 | 0.300 | 0.290 | 0.125 | 2049 | 4 | 1.5 | 0.9 / 0.1 |"),
    ],
)
def test_a_row_reports_the_drawdown_of_its_task(task, line, tmp_path):
    """qa and fc log a perplexity too; their drawdown is the accuracy's (the paper's), gen's the perplexity's. The
    table of a made-up report, line by line."""
    results = {"edit/acc_val": 0.5, "time/edit_val": 0.125}
    results.update({"perplexity/drawdown_val": 0.8, "perplexity/pre_val": 28.0, "perplexity/post_val": 28.8})
    results.update({"acc/drawdown_val": 0.01, "acc/pre_val": 0.3, "acc/post_val": 0.29})
    report = {
        "results": results,
        "config": {"task": task},
        "train": {"steps": 4, "seconds": 90.0},
        "memory": {"peak_rss_mb": 2048.6},
    }
    paper = {"MEND": "0.9 / 0.1", "ENN": "0.8 / 0.2"}
    rows = [
        compare_editors.row("MEND", report, paper),
        compare_editors.row("EFK", {"results": {}, "train": report["train"]}, paper),
    ]
    compare_editors.write_tables(rows, str(tmp_path), "t", task)
    header, rule, mend, efk = (tmp_path / "t.md").read_text().splitlines()
    what = "perplexity" if task == "gen" else "accuracy"
    assert header == (
        f"| editor | edit success | drawdown | {what} before | {what} after | median edit time (s) | peak memory (MB) "
        "| training steps | training time (min) | paper ES / drawdown |"
    )
    assert rule == "|" + "---|" * 10
    assert mend == line
    assert efk == "| EFK | - | - | - | - | - | - | 4 | 1.5 | - |"  # figures it lacks, and no paper figure
    with open(tmp_path / "t.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[0]["drawdown"]) == (0.8 if task == "gen" else 0.01)
    assert float(csv_rows[0][f"{what} before"]) == (28.0 if task == "gen" else 0.3)


def test_multi_edit_table_trains_at_k_edits_and_scores_every_cell_with_n_edits_in_one_update(
    workspace,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "multi"
    args = [
        "--experiment=gen",
        "--model=distilgpt2",
        "--train=2",
        "--steps=2",
        "--eval-edits=1,3",
        "--cases=4",
        "--threads=1",
        f"--out={out}",
        "--",
        *tiny(workspace),
        "val_steps=1",
    ]
    multi_edit_table.main(args)
    # the editor was trained at its number of edits per batch, with one locality example beside them
    cfg = json.loads((out / "train_n2" / "results.json").read_text())["config"]
    assert (cfg["data"]["n_edits"], cfg["batch_size"], cfg["val_batch_size"]) == (2, 3, 3)
    # every cell edited n at a time, ceil(4 / n) batches, with the trained editor
    for n, batches in ((1, 4), (3, 2)):
        report = json.loads((out / "eval" / f"mend_2_x{n}" / "results.json").read_text())
        assert report["config"]["data"]["n_edits"] == n and report["config"]["eval_only"]
        assert report["config"]["archive"] == str(out / "train_n2")
        assert report["results"]["eval_time/n_edits"] == n * batches
    with open(out / "multi_edit.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["editor", "1 at once (4 edits)", "3 at once (6 edits)"]
    assert rows[1] == ["MEND, zsRE / BART-base (the paper's Table 5): edit success", "0.98", "-"]
    one, three = (cell_of(out, f"mend_2_x{n}") for n in (1, 3))
    assert rows[2] == ["MEND-2: edit success", f"{one['edit/acc_val']:.2f}", f"{three['edit/acc_val']:.2f}"]
    assert rows[3] == [
        "MEND-2: target token accuracy",
        f"{one['edit/acc_tok_val']:.2f}",
        f"{three['edit/acc_tok_val']:.2f}",
    ]
    assert rows[4] == ["MEND-2: locality KL", f"{one['loss/loc_val']:.3f}", f"{three['loss/loc_val']:.3f}"]
    pre, post = three["perplexity/pre_val"], three["perplexity/post_val"]
    assert rows[5][0] == "MEND-2: locality perplexity, before -> after" and rows[5][2] == f"{pre:.3g} -> {post:.3g}"
    assert len(rows) == 6 and (out / "multi_edit.md").read_text().count("\n") == 7

    assert multi_edit_table.archive_alg(str(out / "train_n2")) == "mend"  # read from the checkpoint's metadata

    # a second call reuses every finished run; bad arguments are refused by name
    capsys.readouterr()
    multi_edit_table.main(args)
    assert capsys.readouterr().out.count("finished earlier with the same settings") == 3
    for bad, says in (
        ([], "nothing to evaluate"),
        (["--train=0"], "at least 1"),
        (["--editor=x"], "NAME=ARCHIVE"),
        ([f"--editor=x={tmp_path / 'none'}"], "does not exist"),
    ):
        with pytest.raises(SystemExit) as info:
            multi_edit_table.main(bad)
        assert info.value.code == 2 and says in capsys.readouterr().err


def cell_of(out, name: str) -> dict:
    return json.loads((out / "eval" / name / "results.json").read_text())["results"]


def test_multi_edit_rows_show_the_perplexity_where_logged_else_the_token_accuracy():
    gen = {"edit/acc_val": 0.5, "edit/acc_tok_val": 0.75, "perplexity/pre_val": 57.0, "perplexity/post_val": 2.7e6}
    gen["loss/loc_val"] = 0.125
    fc = {"edit/acc_val": 1.0, "acc_tok/pre_val": 0.9, "acc_tok/post_val": 0.85}
    rows = multi_edit_table.table_rows({"A": {1: gen, 7: gen}, "B": {1: fc, 7: {}}}, [1, 7])
    assert rows == [
        ["MEND, zsRE / BART-base (the paper's Table 5): edit success", "0.98", "-"],
        ["A: edit success", "0.50", "0.50"],
        ["B: edit success", "1.00", "-"],
        ["A: target token accuracy", "0.75", "0.75"],
        ["B: target token accuracy", "-", "-"],
        ["A: locality KL", "0.125", "0.125"],
        ["B: locality KL", "-", "-"],
        ["A: locality perplexity, before -> after", "57 -> 2.7e+06", "57 -> 2.7e+06"],
        ["B: locality token accuracy, before -> after", "0.900 -> 0.850", "-"],
    ]


def test_an_editor_given_by_archive_is_evaluated_as_the_editor_it_was_trained_as(tmp_path, monkeypatch):
    calls = []

    def run_once(name, run_dir, overrides, *rest):
        calls.append((name, overrides))
        return {"results": {"edit/acc_val": 1.0}}

    monkeypatch.setattr(multi_edit_table, "run_once", run_once)
    monkeypatch.setattr(multi_edit_table, "archive_alg", lambda archive: {"a": "malmen", "b": "rledit"}[archive[-1]])
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    out = tmp_path / "out"
    multi_edit_table.main(
        [f"--editor=A={tmp_path / 'a'}", f"--editor=B={tmp_path / 'b'}", "--eval-edits=1,2", f"--out={out}"]
    )
    assert [(name, o[0]) for name, o in calls] == [
        ("A x1", "+alg=malmen"),
        ("A x2", "+alg=malmen"),
        ("B x1", "+alg=rledit"),
        ("B x2", "+alg=rledit"),
    ]
    assert f"archive={tmp_path / 'b'}" in calls[-1][1] and "data.n_edits=2" in calls[-1][1]
