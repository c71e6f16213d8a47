"""MEND's batched-edit table (the paper's Table 5): editors trained with K edits per batch, each evaluated with 1, 5,
25, 75 and 125 held-out edits given in one update.

    python -m benchmarks.multi_edit_table --experiment qa --train 1,5,25,100 --steps 400 --out outputs/multi_qa \
        -- data.facts=large
    python -m benchmarks.multi_edit_table --experiment counterfact --editor MEND=outputs/big_mend \
        --editor MEND-5=outputs/big_mend_n5 --out outputs/multi_cf -- data.facts=large

As in the original code, one ``data.n_edits`` sets both the training and the validation batches, so an editor
trained here with ``--train K`` is trained (and its best checkpoint chosen) at K edits per batch, with one locality
example per batch (``batch_size=K+1``). ``--editor NAME=ARCHIVE`` adds an editor trained elsewhere, of any learned
kind (MEND, MALMEN, RLEdit, ...: read from the archive). Every cell is
``python -m run ... eval_only=True archive=<editor> data.n_edits=<N>`` with ``ceil(--cases / N)`` batches of N edits,
so each cell scores at least ``--cases`` held-out edits. Runs that finished with the same settings are reused; an
interrupted table continues where it stopped (``--force`` reruns everything).

Written to ``--out``: ``multi_edit.md`` and ``multi_edit.csv`` (per editor: edit success, the target's token
accuracy, the KL of the locality example's predictions from the unedited model's (the training's locality loss),
and the locality example's perplexity before and after the update, or its token accuracy where the task
logs no perplexity), beside the paper's Table 5 (zsRE, BART-base). Arguments after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

from benchmarks.compare_editors import run_dir_name, run_once
from checkpoints import checkpoint_path, read_checkpoint

# The paper's Table 5: MEND's edit success with N zsRE edits in one update (BART-base), as printed.
PAPER_TABLE5 = {1: 0.98, 5: 0.97, 25: 0.89, 75: 0.78, 125: 0.67}
EVAL_EDITS = (1, 5, 25, 75, 125)
# (label, results key, format) of the rows every editor gets, before its locality score
METRIC_ROWS = (
    ("edit success", "edit/acc_val", "{:.2f}"),
    ("target token accuracy", "edit/acc_tok_val", "{:.2f}"),
    ("locality KL", "loss/loc_val", "{:.3f}"),
)


def editor_name(k: int) -> str:
    """MEND trained with k edits per batch: "MEND" for one edit, as the paper names it, else "MEND-k"."""
    return "MEND" if k == 1 else f"MEND-{k}"


def base_overrides(args, alg: str = "mend") -> list:
    return [
        f"+alg={alg}",
        f"+experiment={args.experiment}",
        f"+model={args.model}",
        f"seed={args.seed}",
        "eval.compare_untrained=false",
        "wandb.enabled=false",
    ]


def edits_overrides(n: int) -> list:
    """n edits per batch and one locality example beside them, as the original's batches."""
    return [f"data.n_edits={n}", f"batch_size={n + 1}", f"val_batch_size={n + 1}"]


def train_editor(k: int, args) -> str:
    """Train (or reuse) MEND with k edits per batch; the run directory, an archive for the cells."""
    run_dir = os.path.abspath(os.path.join(args.out, f"train_n{k}"))
    overrides = [*base_overrides(args), f"max_iters={args.steps}", *edits_overrides(k), *args.overrides]
    run_once(f"train {editor_name(k)}", run_dir, overrides, args.threads, args.force)
    return run_dir


def cell_batches(n: int, cases: int) -> int:
    """Batches of n edits in a cell: enough for at least ``cases`` edits, at least one."""
    return max(1, math.ceil(cases / n))


def archive_alg(archive: str) -> str:
    """The editor (``alg``) a trained run directory or checkpoint was trained as, from its metadata."""
    return read_checkpoint(checkpoint_path(archive), key="--editor")["meta"]["alg"]


def evaluate_cell(name: str, archive: str, n: int, args, alg: str = "mend") -> dict:
    """One cell: the ``alg`` editor at ``archive`` with n edits in one update; the results of its results.json."""
    run_dir = os.path.abspath(os.path.join(args.out, "eval", f"{run_dir_name(name)}_x{n}"))
    overrides = [
        *base_overrides(args, alg),
        "eval_only=True",
        f"archive={os.path.abspath(archive)}",
        *edits_overrides(n),
        f"eval.final_steps={cell_batches(n, args.cases)}",
        *args.overrides,
    ]
    return run_once(f"{name} x{n}", run_dir, overrides, args.threads, args.force)["results"]


def locality_keys(results: dict) -> tuple:
    """(label, pre key, post key, format) of the locality score shown: the perplexity of the batch's locality
    example where the task logs one (gen, qa, counterfact: it shows an update that wrecks the model even where the
    model never knew the locality answers), else its token accuracy (fc)."""
    if "perplexity/pre_val" in results:
        return "locality perplexity, before -> after", "perplexity/pre_val", "perplexity/post_val", "{:.3g}"
    return "locality token accuracy, before -> after", "acc_tok/pre_val", "acc_tok/post_val", "{:.3f}"


def table_rows(cells: dict, evals) -> list:
    """Rows of the table: ``cells`` is editor -> n -> results; four rows per editor."""
    rows = [["MEND, zsRE / BART-base (the paper's Table 5): edit success", *(_num(PAPER_TABLE5.get(n)) for n in evals)]]
    for label, key, fmt in METRIC_ROWS:
        for name, by_n in cells.items():
            rows.append([f"{name}: {label}", *(_num(by_n[n].get(key), fmt) for n in evals)])
    for name, by_n in cells.items():
        label, pre, post, fmt = locality_keys(next(iter(by_n.values())))
        rows.append([f"{name}: {label}", *(_change(by_n[n].get(pre), by_n[n].get(post), fmt) for n in evals)])
    return rows


def _num(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _change(pre, post, fmt: str) -> str:
    if pre is None or post is None:
        return "-"
    return f"{fmt.format(pre)} -> {fmt.format(post)}"


def write(rows, evals, out: str, cases: int) -> str:
    header = ["editor", *(f"{n} at once ({n * cell_batches(n, cases)} edits)" for n in evals)]
    with open(os.path.join(out, "multi_edit.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "multi_edit.md"), "w") as f:
        f.write(text)
    return text


def parse_editor(text: str) -> tuple:
    name, sep, archive = text.partition("=")
    if not sep or not name.strip() or not archive.strip():
        raise argparse.ArgumentTypeError(f"--editor {text!r}: give NAME=ARCHIVE (a run directory or checkpoint)")
    if not os.path.exists(archive):
        raise argparse.ArgumentTypeError(f"--editor {text!r}: {archive} does not exist")
    return name.strip(), archive.strip()


def int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated whole numbers, e.g. 1,5,25") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers of edits, each at least 1")
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="qa")
    parser.add_argument("--model", default="smollm2", help="a config/model name (default: the embedded SmolLM2)")
    parser.add_argument("--train", type=int_list, default=[], help="train MEND with these edits per batch, e.g. 1,5")
    parser.add_argument("--steps", type=int, default=400, help="training steps of each editor that --train trains")
    parser.add_argument("--editor", type=parse_editor, action="append", default=[], help="NAME=ARCHIVE, repeatable")
    parser.add_argument("--eval-edits", type=int_list, default=list(EVAL_EDITS), help="edits in one update per cell")
    parser.add_argument("--cases", type=int, default=125, help="at least this many held-out edits per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("outputs", "multi_edit"))
    parser.add_argument("--force", action="store_true", help="rerun what finished earlier")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    if not args.train and not args.editor:
        parser.error("nothing to evaluate: give --train K[,K...] and/or --editor NAME=ARCHIVE")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    trained = {editor_name(k): train_editor(k, args) for k in args.train}
    editors = {**trained, **dict(args.editor)}
    algs = {name: "mend" if name in trained else archive_alg(archive) for name, archive in editors.items()}
    cells = {
        name: {n: evaluate_cell(name, archive, n, args, algs[name]) for n in args.eval_edits}
        for name, archive in editors.items()
    }
    text = write(table_rows(cells, args.eval_edits), args.eval_edits, args.out, args.cases)
    print(text)
    print(f"Wrote {args.out}/multi_edit.md and multi_edit.csv in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
