"""Which layer a locate-then-edit editor should write to: a measured sweep over layers.

For each layer L it writes an archive of the editor editing the MLP output projection of block L
(``python -m run +alg=<alg> +experiment=counterfact +model=<model> <alg>.layers=[L]``), scores single edits on the
first ``--n`` held-out cases (``python -m edit eval --mode single``) and puts the layers side by side: one table row
per layer, and a plot of efficacy, paraphrase and neighbourhood scores against the layer.

    python -m benchmarks.layer_sweep --alg rome --model smollm2 --layers 2,5,8,12,15 --n 10 \
        --out outputs/lsweep --plot docs/layer_sweep.png

A layer whose report is already in ``--out`` is not run again (so a sweep can be extended layer by layer), and its
figures are taken over its first ``--n`` cases, so that reports of more cases compare with the others. Each layer's
key statistics are computed by its first edit and cached (``key_stats.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

from fact_metrics import summarize

COLUMNS = (
    ("efficacy", "post_efficacy_score"),
    ("paraphrase", "post_paraphrase_score"),
    ("neighborhood", "post_neighborhood_score"),
    ("neighb. share", "neighborhood_share"),
    ("score S", "post_score"),
    ("greedy", "post_generative"),
    ("greedy, paraphrase", "post_generative_paraphrase"),
    ("locality", "post_locality"),
)


def run_layer(args, layer: int) -> str:
    """The report of ``layer``'s single edits, run unless already in ``--out``."""
    archive = os.path.join(args.out, f"{args.alg}_L{layer}")
    report_dir = os.path.join(args.out, f"{args.alg}_L{layer}_eval")
    report = os.path.join(report_dir, "single.json")
    if os.path.exists(report):
        return report
    python = sys.executable
    if not os.path.exists(os.path.join(archive, "checkpoints")):
        subprocess.run(
            [python, "-m", "run", f"+alg={args.alg}", "+experiment=counterfact", f"+model={args.model}",
             f"{args.alg}.layers=[{layer}]", f"hydra.run.dir={archive}",
             "wandb.enabled=false", *args.override],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    subprocess.run(
        [python, "-m", "edit", "eval", "--archive", archive, "--n", str(args.n), "--mode", "single", "--out",
         report_dir, "-q", "--overwrite"],
        check=True,
    )  # fmt: skip
    return report


def layer_summary(report: str, n: int) -> Dict[str, float]:
    with open(report, encoding="utf-8") as f:
        run = json.load(f)
    cases = run["cases"][:n]
    out = summarize(cases)
    out["edit_seconds"] = sorted(c["time"] for c in cases)[len(cases) // 2] if cases else float("nan")
    return out


def table(rows: Dict[int, Dict[str, float]], alg: str, n: int) -> str:
    head = ["layer", *(name for name, _ in COLUMNS), "median edit (s)"]
    lines = [
        f"{alg}, single edits on the first {n} held-out cases, by edited layer (scores in percent)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for layer, s in sorted(rows.items()):
        cells = [str(layer)]
        cells += ["" if s.get(key) is None else f"{100 * s[key]:.1f}" for _, key in COLUMNS]
        cells.append(f"{s['edit_seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Dict[int, Dict[str, float]], path: str, title: str) -> None:
    import matplotlib  # only when a plot is asked for: the table needs no matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    layers = sorted(rows)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, key in COLUMNS[:4]:
        ax.plot(layers, [100 * rows[i].get(key, float("nan")) for i in layers], marker="o", label=name)
    ax.set_xlabel("edited block")
    ax.set_ylabel("percent")
    ax.set_title(title)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alg", default="rome", help="rome, memit or alphaedit (one layer each)")
    parser.add_argument("--model", default="smollm2", help="the +model= config")
    parser.add_argument("--layers", required=True, help="comma-separated block numbers")
    parser.add_argument("--n", type=int, default=10, help="held-out cases per layer")
    parser.add_argument("--out", default="outputs/sweep")
    parser.add_argument("--table", default=None, help="write the markdown table here")
    parser.add_argument("--plot", default=None, help="write a PNG of the scores against the layer here")
    parser.add_argument("--override", action="append", default=[], help="another python -m run override")
    args = parser.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--layers takes comma-separated block numbers, not {args.layers!r}")
    rows = {layer: layer_summary(run_layer(args, layer), args.n) for layer in layers}
    text = table(rows, args.alg, args.n)
    print(text)
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(text)
    if args.plot:
        plot(rows, args.plot, f"{args.alg} on {args.model}: single edits by layer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
