"""Several editors' ``python -m edit eval --out DIR`` reports side by side: one table and one plot against the number
of edits.

    python -m benchmarks.many_edits --run "MEND=outputs/many/mend" --run "UltraEdit=outputs/many/ultra" \
        --table docs/many_edits.md --plot docs/many_edits.png

Each ``--run NAME=DIR`` reads every ``<mode>-<n_edits>[-by-<k>].json`` (and ``single.json``) in DIR, as
``python -m edit eval --out DIR`` writes them, several invocations into one DIR included. The table has one row per
editor, mode and number of edits (scores in percent; the greedy check, token locality, the neighbourhood score as a
share of the unedited model's, the first 100 edits' retention, and the seconds the edits and the scoring took); the
plot draws efficacy and the neighbourhood share against the number of edits, one colour per editor, batched solid
and sequential dashed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List

COLUMNS = (
    ("efficacy", "post_efficacy_score", "pct"),
    ("paraphrase", "post_paraphrase_score", "pct"),
    ("neighborhood", "post_neighborhood_score", "pct"),
    ("neighb. share", "neighborhood_share", "pct"),
    ("greedy", "post_generative", "pct"),
    ("greedy, paraphrase", "post_generative_paraphrase", "pct"),
    ("rewrite acc", "post_rewrite_acc", "pct"),
    ("locality", "post_locality", "pct"),
    ("first 100 retained", "retained", "pct"),
    ("edits/s", "edits_per_second", "num"),
    ("edit s", "edit_seconds", "int"),
    ("scoring s", "eval_seconds", "int"),
)


def load_runs(directory: str) -> List[dict]:
    """The run reports of one ``python -m edit eval --out`` directory, without their per-case records."""
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        if isinstance(run, dict) and "summary" in run and "mode" in run:
            runs.append({k: run[k] for k in ("mode", "n_edits", "summary") if k in run} | {"file": path})
            runs[-1]["edits_per_step"] = run.get("edits_per_step", 1)
    if not runs:
        raise SystemExit(f"error: {directory} holds no report of python -m edit eval (*.json with a summary).")
    return sorted(runs, key=lambda r: (r["mode"] != "batched", r["n_edits"]))


def cell(value, kind: str) -> str:
    if value is None:
        return ""
    return {"pct": f"{100 * value:.1f}", "num": f"{value:.1f}", "int": f"{value:.0f}"}[kind]


def table(editors: Dict[str, List[dict]]) -> str:
    head = "| editor | mode | edits (cases) | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 3) + "|"]
    for name, runs in editors.items():
        shown = set()
        for r in runs:
            n = r["summary"]["n_cases"]
            if n not in shown:  # the unedited model on the cases of this run (the first n of the split)
                shown.add(n)
                pre = {"post_" + k[4:]: v for k, v in r["summary"].items() if k.startswith("pre_")}
                cells = " | ".join(cell(pre.get(k), kind) for _, k, kind in COLUMNS)
                lines.append(f"| {name}, before ({n} cases) | | | {cells} |")
            mode = r["mode"] if r["mode"] != "sequential" else f"sequential, {r['edits_per_step']} per update"
            cells = " | ".join(cell(r["summary"].get(k), kind) for _, k, kind in COLUMNS)
            lines.append(f"| {name} | {mode} | {r['n_edits']} ({n} cases) | {cells} |")
    return "\n".join(lines)


def plot(editors: Dict[str, List[dict]], path: str) -> None:
    from matplotlib.figure import Figure  # only the plot needs it

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for (title, key), ax in zip(
        (("efficacy", "post_efficacy_score"), ("neighbourhood share", "neighborhood_share")), axes
    ):
        for i, (name, runs) in enumerate(editors.items()):
            for mode, style in (("batched", "-"), ("sequential", "--")):
                part = [r for r in runs if r["mode"] == mode and r["summary"].get(key) is not None]
                if part:
                    xs = [r["n_edits"] for r in part]
                    ax.plot(xs, [100 * r["summary"][key] for r in part], style, marker="o", color=f"C{i}",
                            label=f"{name}, {mode}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("edits")
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 105)
        ax.set_title(title, fontsize=9)
    axes[1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.many_edits", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=DIR of a python -m edit eval --out")
    p.add_argument("--table", help="write the markdown table here (default: print it)")
    p.add_argument("--plot", help="PNG of efficacy and neighbourhood share against the number of edits")
    args = p.parse_args(argv)
    editors = {}
    for spec in args.run:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            p.error(f"--run {spec!r}: expected NAME=DIR")
        editors[name] = load_runs(directory)
    text = table(editors)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    if args.plot:
        plot(editors, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
