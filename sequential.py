"""Sequential editing on the editor's own task: apply edits one after another and watch the earlier ones and the
locality.

``python -m edit eval-sequential --archive outputs/<run> --n 100 --checkpoints 1,10,100 [--plot seq.png]`` runs
:func:`eval_sequential` with a trained :class:`edit.Editor`: after 1, 10, 100 edits, how many of the edits so far still
hold (on their prompts and their rephrasings) and the perplexity drawdown on locality passages. The edits come from
the validation split of the data the editor was trained on (``task``): gen passages and their sampled continuations,
CounterFact cases or zsRE questions.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from data_classes import dataset_class
from data_classes.counterfact import load_split
from data_classes.gen import GenDataset, embedded_params, embedded_set
from data_classes.requests import EditRequest, EditTokens
from errors import EditRequestError

LOG = logging.getLogger("edit")
TASKS = ("gen", "counterfact", "qa")  # the experiments whose edits are prompt continuations of a language model


def _quiet(line: str) -> None:
    pass


def eval_sequential(
    editor,
    n: int = 100,
    checkpoints: Sequence[int] = (1, 10, 100),
    plot: Optional[str] = None,
    n_loc: int = 20,
    split: str = "validation",
    cache_dir: Optional[str] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    say: Callable[[str], None] = _quiet,
) -> dict:
    """Apply ``n`` edits from the ``split`` of the editor's own task one after another; after each checkpoint count,
    report how many of the edits so far still hold (ES on their prompts, and on their rephrasings) and the
    perplexity drawdown (post - pre) on ``n_loc`` locality passages. Writes a PNG plot to ``plot`` when given.
    ``progress(stage, done, total)`` is told of the edits applied; ``say(line)`` of the data about to be read,
    built or sampled."""
    cache_dir = os.path.expanduser(cache_dir or editor.config.cache_dir)
    toks, loc_ids, source = _edits(editor, n, n_loc, split, cache_dir, say)
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
        if progress is not None:
            progress("sequential edits", k, len(toks))
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
    result = {"archive": editor.path, "n": n, "n_loc": len(loc_ids), "source": source, "checkpoints": rows}
    if plot:
        result["plot"] = plot_sequential(rows, plot, title=f"sequential edits: {editor.config.model.name}")
    return result


def _edits(editor, n: int, n_loc: int, split: str, cache_dir: str, say) -> Tuple[List[EditTokens], List[list], str]:
    """``n`` edits (as tokens, each with one rephrasing) drawn in a seeded order from ``split`` of the editor's task,
    the locality passages (ids) of the first of them (at most ``n_loc`` distinct ones), and where they came from."""
    cfg = editor.config
    task = cfg.get("task", "gen")
    if task not in TASKS:
        raise EditRequestError(
            f"{editor.path}: eval-sequential edits prompt continuations (the {', '.join(TASKS)} experiments); this "
            f"editor was trained on the {task} experiment."
        )
    seed = int(cfg.seed)
    if task == "gen":
        if not cfg.data.path:
            cached = embedded_set(cache_dir, embedded_params(cfg.data, seed, cfg.model.name))
            if not cached.built():
                say(
                    f"eval-sequential: the editor was trained on the embedded gen set, which is not in the cache: "
                    f"sampling its targets with the base model first (once, into {cached.dir}; minutes on a CPU)"
                )
        ds = GenDataset(
            editor.tokenizer, cfg.data, split, seed=seed, cache_dir=cache_dir, model=editor.model,
            model_id=cfg.model.name, device=editor.device,
        )  # fmt: skip
        order = _order(seed, len(ds), n)
        toks = [EditTokens(ds.passage_ids[i], ds.target_ids[i], [ds.rephrase(i)[1]]) for i in order]
        locality = [ds.locality_ids(i) for i in order]
        source = str(ds.source)
    elif task == "counterfact":
        cases, source = load_split(cfg.data, split, seed, cache_dir)
        order = _order(seed, len(cases), n)
        toks, locality = [], []
        for i in order:
            c = cases[i]
            prompt = c["prompt"].format(c["subject"])
            request = EditRequest(prompt, c["target_new"], rephrases=[(c["paraphrase_prompts"] or [prompt])[0]])
            toks.append(editor.tokenize(request))
            neighbour = (c["neighborhood_prompts"] or [prompt])[0]
            locality.append(editor.encode(f"{neighbour} {c['target_true']}"))
    else:
        ds = dataset_class(task)(editor.tokenizer, cfg.data, split, seed, cache_dir, model=editor.model)
        order = _order(seed, len(ds), n)
        toks, locality = [], []
        for i in order:
            r = ds[i]
            toks.append(editor.tokenize(EditRequest(r["question"], r["target"], rephrases=[r["rephrase"]])))
            locality.append(editor.encode(f"{r['loc']} {r['loc_ans']}"))
        source = str(ds.source)
    say(f"eval-sequential: {n} edits from the {split} split of the {task} data the editor was trained on ({source})")
    loc_ids: List[list] = []
    for ids in locality:
        if ids not in loc_ids:
            loc_ids.append(ids)
        if len(loc_ids) >= n_loc:
            break
    return toks, loc_ids, source


def _order(seed: int, size: int, n: int) -> List[int]:
    """The first ``n`` examples of a seeded order of ``size`` examples (wrapping around when ``n`` exceeds it)."""
    order = np.random.default_rng(seed).permutation(size).tolist()
    return [order[k % len(order)] for k in range(n)]


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
