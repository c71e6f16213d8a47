"""The editor comparison script end to end, on the tiny GPT-2 workspace of test_run."""

from __future__ import annotations

import csv
import json
import os

import pytest
from test_run import INNER, workspace  # noqa: F401  (the module-scoped CLI workspace fixture)

from benchmarks import compare_editors


def test_comparison_writes_the_table_and_plot_and_skips_finished_runs(workspace, tmp_path, capsys, monkeypatch):  # noqa: F811
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
        f"model.name={workspace['model']}",
        f"model.tokenizer_name={workspace['model']}",
        f"model.inner_params={INNER}",
        f"data.path={workspace['data']}",
        f"cache_dir={workspace['cache']}",
        "device=cpu",
        "mend.rank=8",
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
        assert float(r["peak memory (MB)"]) > 0
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
