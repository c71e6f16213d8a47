"""MEND against the baselines (EFK, ENN, FT, FT+KL) on one task, in the form of the paper's Table 4.

    python -m benchmarks.compare_editors                          # embedded SmolLM2-135M on gen, this machine
    python -m benchmarks.compare_editors --editors MEND,MALMEN    # MALMEN (not in the paper) beside MEND
    python -m benchmarks.compare_editors --steps 400 --eval-edits 100 --out outputs/compare
    python -m benchmarks.compare_editors --model distilgpt2 --steps 100000 --eval-edits 500 -- device=cuda

Every editor runs through ``python -m run`` with the same model, data, seed, training-step budget
(``--steps``; FT and FT+KL train nothing) and held-out evaluation edits (``--eval-edits``). Each run
writes its own directory under ``--out``; an editor whose run finished with the same settings is not
run again, so an interrupted comparison continues where it stopped (``--force`` reruns everything).

Written to ``--out``: ``comparison.csv`` and ``comparison.md`` (edit success and drawdown per editor,
with the median edit time, the peak resident memory of the run, and the training time), and
``comparison.png`` (edit success against drawdown, one point per editor).
Arguments after ``--`` are passed to every run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

from matplotlib.figure import Figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (alg, overrides that make it this editor)
EDITORS = {
    "MEND": ("mend", []),
    "EFK": ("efk", []),
    "ENN": ("enn", []),
    "FT": ("ft", []),
    "FT+KL": ("ft", ["ft.locality.enabled=true"]),
    # not in the paper; chosen with --editors. MALMEN trains on the experiment's data.n_edits edits per meta-step.
    "MALMEN": ("malmen", []),
}
# the paper's Table 4: what runs when --editors is not given
PAPER_EDITORS = ["MEND", "EFK", "ENN", "FT", "FT+KL"]
# The paper's Table 4 (edit success / drawdown), as printed; "KE" there is EFK. gen: Wikitext with distilGPT-2
# (perplexity drawdown); qa: zsRE with BART-base and fc: FEVER with BERT-base (accuracy drawdown).
PAPER = {
    "gen": {
        "MEND": "0.86 / 0.225",
        "EFK": "0.25 / 0.595",
        "ENN": "0.93 / 0.094",
        "FT": "0.29 / 0.938",
        "FT+KL": "0.17 / 0.059",
    },
    "qa": {
        "MEND": "0.98 / 0.002",
        "EFK": "0.98 / <0.001",
        "ENN": "0.99 / <0.001",
        "FT": "0.96 / <0.001",
        "FT+KL": "0.89 / <0.001",
    },
    "fc": {
        "MEND": ">0.99 / <0.001",
        "EFK": "0.95 / 0.004",
        "ENN": "0.99 / 0.003",
        "FT": "0.76 / <0.001",
        "FT+KL": "0.64 / <0.001",
    },
}


def locality_metric(task: str) -> str:
    """What drawdown is measured in: locality perplexity on gen, whole-answer accuracy on qa and fc."""
    return "perplexity" if task == "gen" else "acc"


def columns(task: str) -> list:
    """(header, row key) of the table for ``task``; the locality columns name their metric."""
    what = "perplexity" if locality_metric(task) == "perplexity" else "accuracy"
    return [
        ("editor", "editor"),
        ("edit success", "es"),
        ("drawdown", "drawdown"),
        (f"{what} before", "loc_pre"),
        (f"{what} after", "loc_post"),
        ("median edit time (s)", "edit_time"),
        ("peak memory (MB)", "peak_mb"),
        ("training steps", "steps"),
        ("training time (min)", "train_min"),
        ("paper ES / drawdown", "paper"),
    ]


def run_overrides(args, alg: str, extra) -> list:
    return [
        f"+alg={alg}",
        f"+experiment={args.experiment}",
        f"+model={args.model}",
        f"seed={args.seed}",
        f"max_iters={args.steps}",
        f"val_interval={args.steps}",
        f"checkpoint_interval={args.steps}",
        f"early_stop_patience={args.steps}",
        f"val_steps={args.val_edits}",
        f"eval.final_steps={args.eval_edits}",
        "eval.compare_untrained=false",
        "wandb.enabled=false",
        *extra,
        *args.overrides,
    ]


def _finished(run_dir: str, overrides) -> dict | None:
    path = os.path.join(run_dir, "results.json")
    settings = os.path.join(run_dir, "compare_settings.json")
    if not (os.path.isfile(path) and os.path.isfile(settings)):
        return None
    with open(settings) as f:
        if json.load(f) != overrides:
            return None
    with open(path) as f:
        return json.load(f)


def run_dir_name(name: str) -> str:
    """The directory of an editor's run under --out: "FT+KL" -> "ft_kl", "no norm" -> "no_norm"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_editor(name: str, args, editors=EDITORS) -> dict:
    """Train (if it learns) and evaluate one editor of ``editors`` (name -> (alg, overrides)); its results.json."""
    alg, extra = editors[name]
    run_dir = os.path.abspath(os.path.join(args.out, run_dir_name(name)))
    return run_once(name, run_dir, run_overrides(args, alg, extra), args.threads, args.force)


def run_once(name: str, run_dir: str, overrides, threads=None, force: bool = False) -> dict:
    """``python -m run <overrides>`` in ``run_dir``, unless a finished run with the same overrides is there.

    A run of the same overrides that stopped early is resumed from its ``last.pt``; a run of other settings is
    removed first. Returns the run's results.json."""
    if not force:
        done = _finished(run_dir, overrides)
        if done is not None:
            print(f"[{name}] finished earlier with the same settings: {run_dir}", flush=True)
            return done
    if os.path.isdir(run_dir):
        # A run of other settings, or one that did not finish: continue it if it can be, else start over.
        last = os.path.join(run_dir, "checkpoints", "last.pt")
        settings = os.path.join(run_dir, "compare_settings.json")
        same = os.path.isfile(settings) and json.load(open(settings)) == overrides
        if not (same and os.path.isfile(last)) or force:
            shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "compare_settings.json"), "w") as f:
        json.dump(overrides, f)
    cmd = [sys.executable, "-m", "run", *overrides, f"hydra.run.dir={run_dir}"]
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
        cmd.append(f"resume={run_dir}")
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "compare.log"), "a") as log:
        env = dict(os.environ)
        if threads is not None:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(
            f"[{name}] python -m run failed (exit {proc.returncode}); see {os.path.join(run_dir, 'compare.log')}"
        )
    print(f"[{name}] done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


def row(name: str, report: dict, paper_figures: dict) -> dict:
    """One table row from a run's results.json, with the paper's (edit success, drawdown) where it has one."""
    res = report["results"]
    metric = locality_metric(report.get("config", {}).get("task", "gen"))
    return {
        "editor": name,
        "es": res.get("edit/acc_val", math.nan),
        "drawdown": res.get(f"{metric}/drawdown_val", math.nan),
        "loc_pre": res.get(f"{metric}/pre_val", math.nan),
        "loc_post": res.get(f"{metric}/post_val", math.nan),
        "edit_time": res.get("time/edit_val", math.nan),
        "peak_mb": report.get("memory", {}).get("peak_rss_mb", math.nan),
        "steps": report["train"]["steps"],
        "train_min": report["train"]["seconds"] / 60,
        "paper": paper_figures.get(name, "-"),
    }


def _fmt(key: str, value, task: str = "gen") -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "-"
    loc = "{:.2f}" if locality_metric(task) == "perplexity" else "{:.3f}"
    fmt = {"es": "{:.2f}", "drawdown": "{:.3f}", "loc_pre": loc, "loc_post": loc, "edit_time": "{:.3f}"}
    fmt.update({"peak_mb": "{:.0f}", "steps": "{:d}", "train_min": "{:.1f}"})
    return fmt.get(key, "{}").format(value)


def write_tables(rows, out: str, stem: str = "comparison", task: str = "gen") -> None:
    cols = columns(task)
    with open(os.path.join(out, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c for c, _ in cols])
        for r in rows:
            writer.writerow([r[k] for _, k in cols])
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r[k], task) for _, k in cols) + " |")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(rows, out: str, title: str, stem: str = "comparison", experiment: str = "gen") -> None:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    xs = [r["drawdown"] for r in rows if not math.isnan(r["drawdown"])] or [0.0]
    span = max(max(xs) - min(xs), 1e-9)
    placed = []
    for r in rows:
        x, y = r["drawdown"], r["es"]
        ax.scatter(x, y, s=50)
        # labels of points that (nearly) coincide go one under the other instead of on top of each other
        near = sum(1 for px, py in placed if abs(px - x) < 0.1 * span and abs(py - y) < 0.06)
        placed.append((x, y))
        ax.annotate(r["editor"], (x, y), textcoords="offset points", xytext=(6, 4 - 12 * near), fontsize=9)
    ax.margins(x=0.3)
    what = "locality perplexity increase" if experiment == "gen" else "accuracy drop on unrelated inputs"
    ax.set_xlabel(f"drawdown ({what}; lower is better)")
    ax.set_ylabel("edit success (higher is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{stem}.png"), dpi=120)


def common_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every comparison of editors shares (model, task, budget, seed, output, threads, overrides)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a config/model name (default: the embedded SmolLM2)")
    parser.add_argument("--experiment", default="gen")
    parser.add_argument("--steps", type=int, default=250, help="training steps of each learned editor")
    parser.add_argument("--val-edits", type=int, default=25, help="validation edits for the best checkpoint")
    parser.add_argument("--eval-edits", type=int, default=50, help="held-out edits of the final evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--force", action="store_true", help="rerun editors that finished earlier")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads per run (OMP_NUM_THREADS); default: torch's choice"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return parser


def run_all(args, names, editors, paper_figures, stem: str, title: str) -> list:
    """Run (or reuse) every named editor, then write ``<stem>.csv``, ``.md`` and ``.png`` under ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    reports = {name: run_editor(name, args, editors) for name in names}
    rows = [row(name, reports[name], paper_figures) for name in editors if name in reports]
    write_tables(rows, args.out, stem, args.experiment)
    write_plot(rows, args.out, title, stem, args.experiment)
    with open(os.path.join(args.out, f"{stem}.md")) as f:
        print(f.read())
    minutes = (time.perf_counter() - start) / 60
    print(f"Wrote {args.out}/{stem}.csv, {stem}.md, {stem}.png in {minutes:.1f} min")
    return rows


def cli(
    argv, description: str, registry: dict, option: str, paper: dict, stem: str, label: str = "", default=None
) -> list:
    """The command line of a comparison: the common options plus ``--<option>``, a comma-separated subset of
    ``registry`` (name -> (alg, overrides); ``default`` when not given, else all of it); runs them and writes
    ``<stem>.*``. ``paper``: task -> name -> figures."""
    parser = common_parser(description, os.path.join("outputs", "compare"))
    chosen = list(default or registry)
    parser.add_argument(
        f"--{option}", default=",".join(chosen), help=f"comma-separated subset of {list(registry)} (default {chosen})"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in getattr(args, option).split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"--{option}: unknown {unknown}; choose from {list(registry)}")
    title = f"{label}{args.experiment}, {args.model}: {args.steps} training steps, {args.eval_edits} held-out edits"
    return run_all(args, names, registry, paper.get(args.experiment, {}), stem, title)


def main(argv=None) -> None:
    cli(argv, __doc__, EDITORS, "editors", PAPER, "comparison", default=PAPER_EDITORS)


if __name__ == "__main__":
    main()
