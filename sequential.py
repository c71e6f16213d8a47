"""Sequential editing on the gen set: apply edits one after another and watch the earlier ones and the locality.

``python -m edit eval-sequential --archive outputs/<run> --n 100 --checkpoints 1,10,100 [--plot seq.png]`` runs
:func:`eval_sequential` with a trained :class:`edit.Editor`: after 1, 10, 100 edits, how many of the edits so far still
hold (on their prompts and their rephrasings) and the perplexity drawdown on locality passages.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

import numpy as np

from data_classes.gen import GenDataset
from data_classes.requests import EditTokens

LOG = logging.getLogger("edit")


def eval_sequential(
    editor,
    n: int = 100,
    checkpoints: Sequence[int] = (1, 10, 100),
    plot: Optional[str] = None,
    n_loc: int = 20,
    split: str = "validation",
    cache_dir: Optional[str] = None,
) -> dict:
    """Apply ``n`` edits from the gen ``split`` one after another; after each checkpoint count, report how
    many of the edits so far still hold (ES on their prompts, and on their rephrasings) and the perplexity
    drawdown (post - pre) on ``n_loc`` locality passages. Writes a PNG plot to ``plot`` when given."""
    cache_dir = os.path.expanduser(cache_dir or editor.config.cache_dir)
    ds = GenDataset(
        editor.tokenizer,
        editor.config.data,
        split,
        seed=editor.config.seed,
        cache_dir=cache_dir,
        model=editor.model,
        model_id=editor.config.model.name,
        device=editor.device,
    )
    order = np.random.default_rng(int(editor.config.seed)).permutation(len(ds)).tolist()
    picks = [order[k % len(order)] for k in range(n)]
    toks = [EditTokens(ds.passage_ids[i], ds.target_ids[i], [ds.rephrase(i)[1]]) for i in picks]
    loc_ids = []
    for i in picks:
        ids = ds.locality_ids(i)
        if ids not in loc_ids:
            loc_ids.append(ids)
        if len(loc_ids) >= n_loc:
            break
    checkpoints = sorted({int(c) for c in checkpoints if 1 <= int(c) <= n})

    def perplexity(model):
        total = count = 0.0
        for ids in loc_ids:
            total, count = total - editor.score(model, [(ids[:1], ids[1:])])[0].log_prob, count + len(ids) - 1
        return math.exp(total / max(count, 1))

    current = editor.base()
    ppl_pre = perplexity(current)
    immediate, rows = [], []
    for k, t in enumerate(toks, 1):
        current.push(editor.edit_patch(current, [t]))
        immediate.append(editor.score(current, [(t.prompt, t.target)])[0].correct)
        if k in checkpoints:
            held = [s.correct for s in editor.score(current, [(x.prompt, x.target) for x in toks[:k]])]
            held_r = [s.correct for s in editor.score(current, [(x.rephrases[0], x.target) for x in toks[:k]])]
            ppl = perplexity(current)
            rows.append(
                {
                    "n_edits": k,
                    "held": sum(held),
                    "held_frac": sum(held) / k,
                    "held_rephrase_frac": sum(held_r) / k,
                    "success_when_applied_frac": sum(immediate) / k,
                    "perplexity_pre": ppl_pre,
                    "perplexity_post": ppl,
                    "drawdown": ppl - ppl_pre,
                }
            )
            LOG.info("%d edits: %d still hold, drawdown %.3f", k, sum(held), ppl - ppl_pre)
    result = {"archive": editor.path, "n": n, "n_loc": len(loc_ids), "checkpoints": rows}
    if plot:
        result["plot"] = plot_sequential(rows, plot, title=f"sequential edits: {editor.config.model.name}")
    return result


def plot_sequential(rows: List[dict], path: str, title: str = "") -> str:
    ks = [r["n_edits"] for r in rows]
    from matplotlib.figure import Figure  # deferred: only the plot needs it, and it adds ~0.8 s to `import edit`

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(ks, [r["held_frac"] for r in rows], "o-", label="earlier edits that hold (prompt)")
    ax.plot(ks, [r["held_rephrase_frac"] for r in rows], "s--", label="... on the rephrasing")
    ax.set_xlabel("number of sequential edits")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.05, 1.05)
    if len(ks) > 1 and max(ks) / min(ks) >= 10:
        ax.set_xscale("log")
    ax2 = ax.twinx()
    ax2.plot(ks, [r["drawdown"] for r in rows], "^:", color="tab:red", label="perplexity drawdown")
    ax2.set_ylabel("perplexity drawdown (post - pre)")
    ax2.set_yscale("symlog", linthresh=1.0)  # drawdowns span from below 1 to many orders of magnitude
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
