"""The tables, plots and files of ``python -m edit eval``: one markdown row per run, the scores against the number
of edits, and the cases of a run as ROME's ``case_<id>.json`` files."""

from __future__ import annotations

import json
import os
from typing import List, Sequence

# (column label, summary key without its pre_/post_ prefix); a column is shown when any run has it.
SUMMARY_COLUMNS = (
    ("efficacy", "efficacy_score"),
    ("paraphrase", "paraphrase_score"),
    ("neighborhood", "neighborhood_score"),
    ("score", "score"),
    ("efficacy magn.", "efficacy_magnitude"),
    ("paraphrase magn.", "paraphrase_magnitude"),
    ("neighborhood magn.", "neighborhood_magnitude"),
    ("rewrite acc", "rewrite_acc"),
    ("rephrase acc", "rephrase_acc"),
    ("greedy", "generative"),
    ("greedy, paraphrase", "generative_paraphrase"),
    ("fluency", "ngram_entropy"),
    ("consistency", "reference_score"),
)
# Figures of the run itself (no before/after), shown after the locality.
RUN_COLUMNS = (
    ("neighb. share", "neighborhood_share", "pct"),
    ("first 100 held", "held_when_applied", "pct"),
    ("... at the end", "held_at_end", "pct"),
    ("retained", "retained", "pct"),
    ("edits/s", "edits_per_second", "num"),
)


def _updates(run: dict) -> int:
    """Edits per update of a sequential run that takes several updates per group; 0 otherwise."""
    step = run.get("edits_per_step", 1)
    return step if run["mode"] == "sequential" and 1 < step < run["n_edits"] else 0


def run_name(run: dict) -> str:
    """The file stem of a run: ``single``, ``batched-100``, ``sequential-1000`` or ``sequential-1000-by-100``
    (100 edits per update)."""
    if run["mode"] == "single":
        return "single"
    return f"{run['mode']}-{run['n_edits']}" + (f"-by-{_updates(run)}" if _updates(run) else "")


# The layouts of ``python -m edit eval --out``: one JSON per run, or a directory per run of ROME's case files.
LAYOUTS = ("run", "rome")
# The prompt kinds whose target NLLs ROME's summariser (experiments/summarize.py) reads from a case's pre / post.
ROME_PROBS = ("rewrite_prompts_probs", "paraphrase_prompts_probs", "neighborhood_prompts_probs")


def rome_case(case: dict) -> dict:
    """A case of a run in ROME's ``case_<id>.json`` layout (what its experiments/evaluate.py writes): ``case_id``,
    ``requested_rewrite`` with the targets as ``{"str": ...}``, ``time``, and ``pre`` / ``post`` with the per-prompt
    ``target_new`` / ``target_true`` NLLs (prompt kinds with no prompt left out, as ROME's summariser would average
    nothing) beside this project's own figures, which the summariser does not read."""
    rewrite = dict(case["requested_rewrite"])
    for key in ("target_new", "target_true"):
        rewrite[key] = {"str": rewrite[key]}
    out = {"case_id": case["case_id"], "requested_rewrite": rewrite, "time": case["time"]}
    for when in ("pre", "post"):
        out[when] = {k: v for k, v in case[when].items() if not (k in ROME_PROBS and not v)}
    return out


def write_rome_cases(run: dict, run_dir: str) -> List[str]:
    """Write each case of ``run`` as ``<run_dir>/case_<id>.json`` (:func:`rome_case`), the files ROME's summariser
    reads from each run directory of the directory it is given; returns the paths."""
    os.makedirs(run_dir, exist_ok=True)
    paths = []
    for case in run["cases"]:
        path = os.path.join(run_dir, f"case_{case['case_id']}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rome_case(case), f, indent=1, ensure_ascii=False)
        paths.append(path)
    return paths


def _label(run: dict) -> str:
    """The table's row label of a run: ``single``, ``batched x100``, ``sequential x1000 (100 per update)``."""
    if run["mode"] == "single":
        return "single"
    return f"{run['mode']} x{run['n_edits']}" + (f" ({_updates(run)} per update)" if _updates(run) else "")


def summary_table(runs: Sequence[dict]) -> str:
    """A markdown table of runs' summaries: one row before editing, one per run after (scores in percent, as the
    papers report them; fluency in bits x 100 as ROME's tables; edits per second of the editing alone)."""
    present = [(label, key) for label, key in SUMMARY_COLUMNS if any(f"post_{key}" in r["summary"] for r in runs)]
    extra = [c for c in RUN_COLUMNS if any(r["summary"].get(c[1]) is not None for r in runs)]
    labels = [label for label, _ in present] + ["locality"] + [c[0] for c in extra]
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(present) + 2 + len(extra)) + "|"]

    def cell(value, kind="pct"):
        if value is None:
            return ""
        return f"{100 * value:.1f}" if kind == "pct" else f"{value:.2f}"

    first = runs[0]["summary"]
    blank = " |" * len(extra)
    lines.append("| before | " + " | ".join(cell(first.get(f"pre_{k}")) for _, k in present) + " | |" + blank)
    for r in runs:
        s = r["summary"]
        cells = [cell(s.get(f"post_{k}")) for _, k in present] + [cell(s.get("post_locality"))]
        cells += [cell(s.get(key), kind) for _, key, kind in extra]
        lines.append(f"| after, {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def warning_lines(runs: Sequence[dict]) -> list:
    """One line per run with edits that made their own target less likely (its NLL on the rewrite prompt rose)."""
    lines = []
    for r in runs:
        bad = [str(c["case_id"]) for c in r.get("cases", []) if c.get("warnings")]
        if bad:
            shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            lines.append(
                f"after, {_label(r)}: {len(bad)} of {len(r['cases'])} edits made their own target less likely "
                f"(case ids {shown})"
            )
    return lines


CURVES = (
    ("efficacy", "post_efficacy_score", "C0"),
    ("paraphrase", "post_paraphrase_score", "C1"),
    ("neighborhood", "post_neighborhood_score", "C2"),
    ("greedy", "post_generative", "C3"),
    ("locality", "post_locality", "C4"),
)


def plot_fact_curve(runs: Sequence[dict], path: str, title: str = "") -> None:
    """The scores after editing (efficacy, paraphrase, neighborhood, greedy, token locality) against the number of
    edits per group: one colour per score, one line style per mode (batched solid, sequential dashed; a single-mode
    run is the point at 1 of each)."""
    import matplotlib  # only the plot needs it (0.8 s of import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file backend

    modes = [m for m in ("batched", "sequential") if any(r["mode"] == m for r in runs)] or ["single"]
    single = [r for r in runs if r["mode"] == "single"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, key, colour in CURVES:
        if not any(r["summary"].get(key) is not None for r in runs):
            continue
        for mode, style in zip(modes, ("-", "--")):
            part = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["n_edits"]) or single
            if mode != "single" and single and all(r["n_edits"] != 1 for r in part):
                part = single + part  # one edit alone is one edit in either mode
            xs = [r["n_edits"] for r in part]
            ys = [100 * (r["summary"].get(key) or 0) for r in part]
            label = name if len(modes) == 1 else f"{name}, {mode}"
            ax.plot(xs, ys, style, color=colour, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("edits (" + " / ".join(modes) + ")")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
