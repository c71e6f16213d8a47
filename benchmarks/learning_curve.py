"""MEND's learning curve on one task: one long training run, validated at a fixed interval, plotted.

    python -m benchmarks.learning_curve --threads 2 --steps 3000 --val-interval 250 --out outputs/curve
    python -m benchmarks.learning_curve --from-run outputs/<run>        # plot a run that has finished

The run goes through ``python -m run`` (``benchmarks.compare_editors.run_once``: a finished run with the same
settings is reused, an interrupted one resumed), with the model's demo schedule except for the step budget, the
validation interval and no early stop. Every validation of the run is kept in its results.json
(``train.validations``); this script writes them to ``curve.csv`` and plots edit success and drawdown against
the training step (``curve.png``), with the paper's figures for the same task as dashed lines.
Arguments after ``--`` go to the run as Hydra overrides.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

from matplotlib.figure import Figure

from benchmarks.compare_editors import locality_metric, run_once

# The paper's MEND row of Table 4 (edit success, drawdown).
PAPER = {"gen": (0.86, 0.225, "distilGPT-2, Wikitext"), "qa": (0.98, 0.002, "BART-base, zsRE")}


def curve_rows(report: dict) -> list:
    """(step, seconds, edit success, drawdown, loss) for every validation recorded in a results.json."""
    metric = locality_metric(report.get("config", {}).get("task", "gen"))
    rows = []
    for v in report["train"].get("validations", []):
        drawdown = v.get(f"{metric}/drawdown_val", float("nan"))
        rows.append(
            {
                "step": int(v["step"]),
                "seconds": float(v.get("seconds", float("nan"))),
                "edit_success": float(v["edit/acc_val"]),
                "drawdown": float(drawdown),
                "loss_total_edit": float(v.get("loss/total_edit_val", float("nan"))),
            }
        )
    return rows


def write_curve(rows, out: str, task: str, title: str) -> None:
    with open(os.path.join(out, "curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "seconds", "edit_success", "drawdown", "loss_total_edit"])
        writer.writeheader()
        writer.writerows(rows)

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(6, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(steps, [r["edit_success"] for r in rows], marker="o")
    top.set_ylabel("edit success (validation)")
    top.set_ylim(-0.05, 1.05)
    bottom.plot(steps, [r["drawdown"] for r in rows], marker="o", color="tab:red")
    bottom.set_ylabel("perplexity drawdown" if task == "gen" else "accuracy drawdown")
    bottom.set_xlabel("training step")
    if task in PAPER:
        es, dd, where = PAPER[task]
        top.axhline(es, ls="--", color="gray", label=f"paper ({where})")
        bottom.axhline(dd, ls="--", color="gray", label=f"paper ({where})")
        top.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curve.png"), dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a config/model name (default: the embedded SmolLM2)")
    parser.add_argument("--experiment", default="gen")
    parser.add_argument("--alg", default="mend")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--val-interval", type=int, default=250, help="steps between validations")
    parser.add_argument("--val-edits", type=int, default=25, help="edits of each validation")
    parser.add_argument("--eval-edits", type=int, default=100, help="held-out edits of the final evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("outputs", "curve"))
    parser.add_argument("--from-run", default=None, help="plot this finished run directory instead of training")
    parser.add_argument("--force", action="store_true", help="rerun even if a run with the same settings finished")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (OMP_NUM_THREADS)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the run (after --)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.val_interval < 1:
        parser.error("--steps and --val-interval must be positive")

    if args.from_run is not None:
        path = os.path.join(args.from_run, "results.json")
        if not os.path.isfile(path):
            parser.error(f"--from-run: no results.json in {args.from_run} (has the run finished?)")
        with open(path) as f:
            report = json.load(f)
        task = report.get("config", {}).get("task", args.experiment)
        alg = report.get("config", {}).get("alg", args.alg)
        out = args.from_run
    else:
        overrides = [
            f"+alg={args.alg}",
            f"+experiment={args.experiment}",
            f"+model={args.model}",
            f"seed={args.seed}",
            f"max_iters={args.steps}",
            f"val_interval={args.val_interval}",
            f"checkpoint_interval={args.val_interval}",
            f"early_stop_patience={args.steps}",
            f"val_steps={args.val_edits}",
            f"eval.final_steps={args.eval_edits}",
            "wandb.enabled=false",
            *args.overrides,
        ]
        out = os.path.abspath(args.out)
        report = run_once("curve", out, overrides, args.threads, args.force)
        task, alg = args.experiment, args.alg
    rows = curve_rows(report)
    if not rows:
        raise SystemExit(f"{out}: the run recorded no validations during training (train.validations is empty)")
    title = f"{alg}, {task}: validation every {rows[0]['step']} steps"
    write_curve(rows, out, task, title)
    for r in rows:
        print(f"step {r['step']:>6}: edit success {r['edit_success']:.2f}, drawdown {r['drawdown']:.3f}")
    res = report["results"]
    dd = res.get(f"{locality_metric(task)}/drawdown_val", float("nan"))
    print(
        f"final evaluation (best checkpoint, step {report['train']['best_step']}): edit success "
        f"{res['edit/acc_val']:.2f}, drawdown {dd:.3f}; {report['train']['seconds'] / 60:.1f} min of training"
    )
    print(f"Wrote {out}/curve.csv and curve.png")


if __name__ == "__main__":
    main()
