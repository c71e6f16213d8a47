"""What a training run reports: its log lines, the final table, and the optional wandb run."""

from __future__ import annotations

import logging
import math
import os
from typing import Dict

from omegaconf import OmegaConf

LOG = logging.getLogger("trainer")


def init_wandb(config, run_dir: str):
    """A wandb run for this training run, or None (wandb off, or not installed: then the console only)."""
    w = config.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    try:
        import wandb  # optional: only runs with wandb.enabled=true need it
    except ImportError:
        LOG.warning("wandb is not installed: logging to the console only (pip install wandb, or wandb.enabled=false).")
        return None
    model = os.path.basename(config.model.name)
    name = f"{config.task}-{config.alg}-{model}-{os.path.basename(run_dir)}"
    return wandb.init(
        project=w.project,
        entity=w.entity,
        mode=w.mode,
        dir=run_dir,
        name=name,
        config=OmegaConf.to_container(config, resolve=True),
    )


def format_stats(stats: Dict[str, float]) -> str:
    """The headline metrics of a log line, as key=value."""
    keys = [
        k
        for k in stats
        if k.split("_val")[0]
        in (
            "loss/total_edit",
            "loss/edit",
            "loss/loc",
            "edit/acc",
            "edit/acc_pre",
            "perplexity/pre",
            "perplexity/post",
            "acc/pre",
            "acc/post",
            "time/edit",
            "grad",
        )
    ]
    return ", ".join(f"{k}={stats[k]:.4g}" for k in keys)


def summary_table(report: dict, task: str) -> str:
    """A side-by-side table of the trained and untrained editor's final metrics."""
    cols = [("trained", report["results"])]
    if "untrained" in report:
        cols.append(("untrained editor", report["untrained"]))
    rows = [
        ("edit success (edit/acc_val)", "edit/acc_val", "{:.3f}"),
        ("edit success before the edit", "edit/acc_pre_val", "{:.3f}"),
        ("target token accuracy", "edit/acc_tok_val", "{:.3f}"),
        ("target log-prob", "edit/log_prob_val", "{:.3f}"),
    ]
    if task == "gen":
        rows += [
            ("locality perplexity, pre-edit", "perplexity/pre_val", "{:.3f}"),
            ("locality perplexity, post-edit", "perplexity/post_val", "{:.3f}"),
            ("drawdown (perplexity increase)", "perplexity/drawdown_val", "{:.3f}"),
        ]
    else:
        rows += [
            ("locality accuracy, pre-edit", "acc/pre_val", "{:.3f}"),
            ("locality accuracy, post-edit", "acc/post_val", "{:.3f}"),
            ("drawdown (accuracy decrease)", "acc/drawdown_val", "{:.4f}"),
        ]
        if task == "qa":  # the original's acc/* count whole answers; the token accuracy beside them
            rows += [("drawdown in token accuracy", "acc_tok/drawdown_val", "{:.4f}")]
    rows += [("median edit time (s)", "time/edit_val", "{:.3f}"), ("edits evaluated", "eval_time/n_edits", "{:.0f}")]
    width = max(len(r[0]) for r in rows) + 2
    lines = ["".ljust(width) + "".join(name.rjust(28) for name, _ in cols)]
    for label, key, fmt in rows:
        cells = []
        for _, stats in cols:
            v = stats.get(key)
            cells.append(
                (fmt.format(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else "-").rjust(28)
            )
        lines.append(label.ljust(width) + "".join(cells))
    return "\n".join(lines)
