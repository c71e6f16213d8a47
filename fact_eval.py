"""Evaluating a trained editor the way the knowledge-editing field reports it, on CounterFact-format cases.

Per case, before and after the edit (EasyEdit's ``pre`` / ``post`` layout):

- ROME / MEMIT's probability tests (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", sec. 4;
  their ``test_batch_prediction``): for each prompt, the mean negative log-probability per token of
  ``" " + target_new`` and of ``" " + target_true``.
  * efficacy (rewrite prompt) and paraphrase: success when the new target is the likelier, ``nll_new < nll_true``;
    magnitude ``exp(-nll_new) - exp(-nll_true)``;
  * neighborhood: success when the true target stays the likelier, ``nll_true < nll_new``; magnitude
    ``exp(-nll_true) - exp(-nll_new)``;
  * each averaged over a case's prompts, then over cases; the score S is the harmonic mean of the efficacy,
    paraphrase and neighborhood scores (the ROME paper's S).
- Generation (``generation=True``): greedy continuations of the generation prompts; fluency is ROME's generation
  entropy, the mean over texts of ``(2/3 * H_2 + 4/3 * H_3) / 2`` with ``H_n`` the entropy in bits of the text's word
  n-gram frequencies; consistency is the TF-IDF cosine similarity between the continuations (joined) and the case's
  reference texts about ``target_new`` (joined), with the inverse document frequencies of a fixed corpus
  (``python -m edit eval``: the reference texts of every case of the data set, whichever cases are evaluated; ROME
  fits its vectorizer on Wikipedia texts). Words are ``\\w\\w+`` runs, lower-cased; the n-grams' tokens are words
  and punctuation marks, an approximation of NLTK's ``word_tokenize``.
- Greedy continuations are generated in left-padded batches (:meth:`patches.EditedModel.greedy_batch`): all of a
  model's generation prompts together, every case on the unedited model and a group's cases after its edit.
- EasyEdit's teacher-forced token accuracies (Yao et al., 2023, "Editing Large Language Models: Problems, Methods,
  and Opportunities"; EasyEdit's ``compute_rewrite_or_rephrase_quality`` and ``compute_locality_quality``):
  ``rewrite_acc`` and ``rephrase_acc``, the fraction of ``target_new``'s tokens that are the argmax prediction after
  the rewrite and paraphrase prompts; ``locality``, the fraction of the neighborhood prompts' argmax tokens (with
  ``target_true`` teacher-forced) that the edit leaves unchanged.

Modes: ``single`` edits each case alone on the unedited model; ``batched`` applies groups of ``n_edits`` cases in
one update; ``sequential`` applies ``n_edits`` cases one after another, each on the model the previous ones edited.
In the last two every case is measured once its whole group is applied, so the drop with ``n_edits`` shows.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from statistics import harmonic_mean
from typing import Dict, List, Optional, Sequence, Tuple

from data_classes.counterfact import load_split
from data_classes.requests import EditRequest

MODES = ("single", "batched", "sequential")
# EasyEdit's BaseEditor.edit options that have no effect here (accepted so that its scripts run unchanged).
EASYEDIT_OPTIONS = ("keep_original_weight", "verbose", "test_generation", "summary_metrics", "eval_metric")
_WORD = re.compile(r"(?u)\b\w\w+\b")
_TOKEN = re.compile(r"\w+|[^\w\s]")


# -- metrics on text ------------------------------------------------------------------------------------------
def n_gram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy of one text: the weighted n-gram entropies (bits), averaged over ``ns``."""
    tokens = _TOKEN.findall(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


class TfIdf:
    """TF-IDF vectors as scikit-learn's default ``TfidfVectorizer`` makes them (raw counts, smoothed idf
    ``ln((1 + n) / (1 + df)) + 1``, L2 norm), fitted on ``corpus``; words outside it are dropped."""

    def __init__(self, corpus: Sequence[str]):
        docs = [set(_WORD.findall(t.lower())) for t in corpus]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}

    def vector(self, text: str) -> Dict[str, float]:
        counts = Counter(w for w in _WORD.findall(text.lower()) if w in self.idf)
        vec = {w: c * self.idf[w] for w, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {w: v / norm for w, v in vec.items()} if norm else {}

    def similarity(self, a: str, b: str) -> float:
        va, vb = self.vector(a), self.vector(b)
        return sum(v * vb.get(w, 0.0) for w, v in va.items())


# -- metrics on the model -------------------------------------------------------------------------------------
def _ids(editor, prompt: str, target: str) -> Tuple[List[int], List[int]]:
    toks = editor.tokenize(EditRequest(prompt, target))
    return toks.prompt, toks.target


def case_metrics(editor, model, case: dict, tfidf: Optional[TfIdf] = None, gen_tokens: int = 0) -> dict:
    """The metrics of one case on ``model`` (see the module docstring), in ROME's record layout."""
    groups = {
        "rewrite_prompts": [case["prompt"].format(case["subject"])],
        "paraphrase_prompts": case["paraphrase_prompts"],
        "neighborhood_prompts": case["neighborhood_prompts"],
        "attribute_prompts": case["attribute_prompts"],
    }
    rows, index = [], []
    for key, prompts in groups.items():
        for p in prompts:
            for which in ("target_new", "target_true"):
                rows.append(_ids(editor, p, case[which]))
                index.append((key, which))
    scores = editor.score(model, rows)
    out: dict = {f"{k}_probs": [] for k in groups}
    argmax_true: Dict[str, list] = {k: [] for k in groups}
    acc_new: Dict[str, list] = {k: [] for k in groups}
    for (key, which), s in zip(index, scores):
        if which == "target_new":
            out[f"{key}_probs"].append({"target_new": s.nll})
            acc_new[key].append(s.accuracy)
        else:
            out[f"{key}_probs"][-1]["target_true"] = s.nll
            argmax_true[key].append(s.argmax)
    out["rewrite_acc"] = acc_new["rewrite_prompts"]
    out["rephrase_acc"] = acc_new["paraphrase_prompts"]
    out["neighborhood_argmax"] = argmax_true["neighborhood_prompts"]
    if gen_tokens:
        out.update(generation_metrics(editor, model, [case], tfidf, gen_tokens)[0])
    return out


def generation_metrics(
    editor, model, cases: Sequence[dict], tfidf: Optional[TfIdf], gen_tokens: int, chunk: int = 32
) -> List[dict]:
    """Per case: the greedy continuations (``gen_tokens`` tokens) of its generation prompts on ``model``, their
    generation entropy and, with ``tfidf`` and reference texts, their consistency. The prompts of all ``cases``
    are generated together, ``chunk`` at a time."""
    prompts = [p for c in cases for p in c["generation_prompts"]]
    conts = editor.greedy_many(model, [editor.encode(p) for p in prompts], gen_tokens, chunk)
    texts = iter(p + editor.decode(ids) for p, ids in zip(prompts, conts))
    out = []
    for case in cases:
        record: dict = {}
        if case["generation_prompts"]:
            record["text"] = [next(texts) for _ in case["generation_prompts"]]
            record["ngram_entropy"] = _mean(n_gram_entropy(t) for t in record["text"])
            if tfidf is not None and case.get("reference_texts"):
                joined = " ".join(case["reference_texts"])
                record["reference_score"] = tfidf.similarity(" ".join(record["text"]), joined)
        out.append(record)
    return out


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def case_summary(pre: dict, post: dict) -> dict:
    """One case's figures: success rates and magnitudes per prompt kind, and EasyEdit's accuracies."""
    out = {}
    for kind, key, new_wins in (
        ("efficacy", "rewrite_prompts_probs", True),
        ("paraphrase", "paraphrase_prompts_probs", True),
        ("neighborhood", "neighborhood_prompts_probs", False),
    ):
        for when, record in (("pre", pre), ("post", post)):
            probs = record[key]
            if not probs:
                continue
            if new_wins:
                wins = [p["target_new"] < p["target_true"] for p in probs]
                diff = [math.exp(-p["target_new"]) - math.exp(-p["target_true"]) for p in probs]
            else:
                wins = [p["target_true"] < p["target_new"] for p in probs]
                diff = [math.exp(-p["target_true"]) - math.exp(-p["target_new"]) for p in probs]
            out[f"{when}_{kind}_score"] = _mean(float(w) for w in wins)
            out[f"{when}_{kind}_magnitude"] = _mean(diff)
    for when, record in (("pre", pre), ("post", post)):
        out[f"{when}_rewrite_acc"] = _mean(record["rewrite_acc"])
        if record["rephrase_acc"]:
            out[f"{when}_rephrase_acc"] = _mean(record["rephrase_acc"])
        for key in ("ngram_entropy", "reference_score"):
            if key in record:
                out[f"{when}_{key}"] = record[key]
    pairs = zip(pre["neighborhood_argmax"], post["neighborhood_argmax"])
    same = [_mean(float(a == b) for a, b in zip(x, y)) for x, y in pairs]
    if same:
        out["post_locality"] = _mean(same)
    return out


def summarize(cases: Sequence[dict]) -> dict:
    """The mean of every per-case figure over the cases, and the score S (harmonic mean of the efficacy,
    paraphrase and neighborhood scores) before and after."""
    keys = sorted({k for c in cases for k in c["summary"]})
    out = {k: _mean(c["summary"][k] for c in cases if c["summary"].get(k) is not None) for k in keys}
    for when in ("pre", "post"):
        parts = [out.get(f"{when}_{k}_score") for k in ("efficacy", "paraphrase", "neighborhood")]
        if all(p is not None for p in parts):
            out[f"{when}_score"] = harmonic_mean(parts) if min(parts) > 0 else 0.0
    out["n_cases"] = len(cases)
    return out


# -- running the edits ----------------------------------------------------------------------------------------
def _tfidf(cases: Sequence[dict], generation: bool, corpus: Optional[Sequence[str]]) -> Optional[TfIdf]:
    if not generation:
        return None
    return TfIdf(corpus if corpus is not None else [t for c in cases for t in c.get("reference_texts", [])])


def pre_edit_metrics(
    editor,
    cases: Sequence[dict],
    generation: bool = False,
    gen_tokens: int = 50,
    reference_corpus: Optional[Sequence[str]] = None,
) -> List[dict]:
    """Every case's metrics on the unedited model (the ``pre`` records of :func:`evaluate`)."""
    tfidf = _tfidf(cases, generation, reference_corpus)
    base = editor.base()
    out = [case_metrics(editor, base, c) for c in cases]
    if generation:
        for record, gen in zip(out, generation_metrics(editor, base, cases, tfidf, gen_tokens)):
            record.update(gen)
    return out


def evaluate(
    editor,
    cases: Sequence[dict],
    mode: str = "single",
    n_edits: int = 1,
    generation: bool = False,
    gen_tokens: int = 50,
    progress=None,
    pre: Optional[List[dict]] = None,
    reference_corpus: Optional[Sequence[str]] = None,
) -> dict:
    """Edit with ``editor`` (an :class:`edit.Editor`) and measure every case before and after; see the module
    docstring for the modes. Returns ``{"summary": ..., "cases": [...]}``; the base model is left unedited.
    ``pre``: the cases' metrics on the unedited model, from :func:`pre_edit_metrics` with the same arguments
    (several runs on the same cases share them); computed here when not given. ``reference_corpus``: the texts
    consistency's inverse document frequencies are fitted on (default: the reference texts of ``cases``); pass the
    whole data set's so that the figure does not depend on how many cases are evaluated."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}.")
    size = 1 if mode == "single" else int(n_edits)
    if size < 1:
        raise ValueError(f"n_edits={n_edits}: must be at least 1.")
    tfidf = _tfidf(cases, generation, reference_corpus)
    base = editor.base()
    if pre is None:
        pre = pre_edit_metrics(editor, cases, generation, gen_tokens, reference_corpus)
    elif len(pre) != len(cases):
        raise ValueError(f"pre: {len(pre)} records for {len(cases)} cases.")
    results = []
    for start in range(0, len(cases), size):
        group = list(range(start, min(start + size, len(cases))))
        t0 = time.perf_counter()
        current = base.copy()
        requests = [EditRequest(cases[i]["prompt"].format(cases[i]["subject"]), cases[i]["target_new"]) for i in group]
        toks = [editor.tokenize(r) for r in requests]
        if mode == "sequential":
            for t, r in zip(toks, requests):
                current.push(editor.edit_patch(current, [t], [r]))
        else:
            current.push(editor.edit_patch(current, toks, requests))
        seconds = (time.perf_counter() - t0) / len(group)
        posts = [case_metrics(editor, current, cases[i]) for i in group]
        if generation:  # the group's generation prompts together, on the model the group edited
            gens = generation_metrics(editor, current, [cases[i] for i in group], tfidf, gen_tokens)
            for post, gen in zip(posts, gens):
                post.update(gen)
        for i, post in zip(group, posts):
            results.append(
                {
                    "case_id": cases[i]["case_id"],
                    "requested_rewrite": {
                        "prompt": cases[i]["prompt"],
                        "subject": cases[i]["subject"],
                        "target_new": cases[i]["target_new"],
                        "target_true": cases[i]["target_true"],
                    },
                    "time": seconds,
                    "pre": pre[i],
                    "post": post,
                    "summary": case_summary(pre[i], post),
                }
            )
        if progress is not None:
            progress(len(group))
    return {"mode": mode, "n_edits": size, "summary": summarize(results), "cases": results}


def evaluate_dataset(
    editor,
    plan: Sequence[Tuple[str, int]],
    path: Optional[str] = None,
    split: str = "validation",
    n: int = 200,
    generation: bool = False,
    gen_tokens: int = 50,
    out_dir: Optional[str] = None,
    plot: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> dict:
    """``python -m edit eval``: the first ``n`` cases of ``split`` (``train``, ``validation`` or ``all``) of the
    CounterFact-format set at ``path`` (a file or ``hf:<dataset id>``; default: the embedded set of the editor's
    configuration), evaluated with :func:`evaluate` once per ``(mode, n_edits)`` of ``plan``, all runs sharing one
    pass over the unedited model. Consistency's inverse document frequencies come from the reference texts of the
    whole data set, so that the figure does not depend on ``n`` or ``split``. ``out_dir``: one JSON per run
    (``<mode>.json`` or ``<mode>-<n_edits>.json``, written as each run ends) and ``summary.md``; ``plot``: a PNG of
    :func:`plot_fact_curve` (with more than one run). Returns ``{"n_cases", "runs", "table", "plot"}``, ``plot``
    the file written or None."""
    data_cfg = editor.config.data.copy()
    data_cfg.path = path
    cache_dir = os.path.expanduser(cache_dir or editor.config.cache_dir)
    seed = editor.config.seed
    loaded = {part: load_split(data_cfg, part, seed, cache_dir)[0] for part in ("train", "validation")}
    parts = ("train", "validation") if split == "all" else (split,)
    cases = [c for part in parts for c in loaded[part]][:n]
    corpus = [t for records in loaded.values() for c in records for t in c.get("reference_texts", [])]
    pre = pre_edit_metrics(editor, cases, generation, gen_tokens, corpus)
    runs = []
    for mode, size in plan:
        run = evaluate(editor, cases, mode, size, generation, gen_tokens, pre=pre, reference_corpus=corpus)
        runs.append(run)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            name = mode + (f"-{size}" if mode != "single" else "")
            with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(run, f, indent=1, ensure_ascii=False)
    table = summary_table(runs)
    if out_dir:
        with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
    drawn = None
    if plot and len(runs) > 1:
        plot_fact_curve(runs, plot)
        drawn = plot
    return {"n_cases": len(cases), "runs": runs, "table": table, "plot": drawn}


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
    ("fluency", "ngram_entropy"),
    ("consistency", "reference_score"),
)


def summary_table(runs: Sequence[dict]) -> str:
    """A markdown table of runs' summaries: one row before editing, one per run after (scores in percent, as the
    papers report them; fluency in bits x 100 as ROME's tables)."""
    present = [(label, key) for label, key in SUMMARY_COLUMNS if any(f"post_{key}" in r["summary"] for r in runs)]
    header = "| | " + " | ".join(label for label, _ in present) + " | locality |"
    lines = [header, "|---" * (len(present) + 2) + "|"]

    def cell(value):
        return "" if value is None else f"{100 * value:.1f}"

    first = runs[0]["summary"]
    lines.append("| before | " + " | ".join(cell(first.get(f"pre_{k}")) for _, k in present) + " | |")
    for r in runs:
        s = r["summary"]
        name = f"{r['mode']} x{r['n_edits']}" if r["mode"] != "single" else "single"
        cells = [cell(s.get(f"post_{k}")) for _, k in present]
        lines.append(f"| after, {name} | " + " | ".join(cells) + f" | {cell(s.get('post_locality'))} |")
    return "\n".join(lines)


def plot_fact_curve(runs: Sequence[dict], path: str) -> None:
    """Efficacy, paraphrase and neighborhood scores (after editing) against the group size: one colour per score,
    one line style per mode (batched solid, sequential dashed; a single-mode run is the point at 1 of each)."""
    import matplotlib  # only the plot needs it (0.8 s of import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file backend

    modes = [m for m in ("batched", "sequential") if any(r["mode"] == m for r in runs)] or ["single"]
    single = [r for r in runs if r["mode"] == "single"]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for key, colour in (("efficacy", "C0"), ("paraphrase", "C1"), ("neighborhood", "C2")):
        for mode, style in zip(modes, ("-", "--")):
            part = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["n_edits"]) or single
            if mode != "single" and single and all(r["n_edits"] != 1 for r in part):
                part = single + part  # one edit alone is one edit in either mode
            xs = [r["n_edits"] for r in part]
            ys = [100 * (r["summary"].get(f"post_{key}_score") or 0) for r in part]
            label = key if len(modes) == 1 else f"{key}, {mode}"
            ax.plot(xs, ys, style, color=colour, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("edits (" + " / ".join(modes) + ")")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the EasyEdit-shaped call ---------------------------------------------------------------------------------
def _per_request(value, n: int, name: str) -> list:
    """EasyEdit's arguments: one value per request, or a single string for a single request."""
    if value is None:
        return [None] * n
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} prompts; give one per prompt.")
    return values


def _named_inputs(inputs: Optional[dict], n: int, name: str) -> Dict[str, list]:
    """``{"name": {"prompt": [...], "ground_truth": [...]}}`` as name -> [(prompt, ground truth) per request]."""
    out = {}
    for key, spec in (inputs or {}).items():
        if not isinstance(spec, dict) or "prompt" not in spec or "ground_truth" not in spec:
            raise ValueError(f"{name}[{key!r}] must be {{'prompt': [...], 'ground_truth': [...]}}.")
        prompts = _per_request(spec["prompt"], n, f"{name}[{key!r}]['prompt']")
        truths = _per_request(spec["ground_truth"], n, f"{name}[{key!r}]['ground_truth']")
        out[key] = list(zip(prompts, truths))
    return out


def easyedit_edit(
    editor,
    prompts,
    target_new,
    ground_truth=None,
    subject=None,
    rephrase_prompts=None,
    locality_inputs: Optional[dict] = None,
    portability_inputs: Optional[dict] = None,
    sequential_edit: bool = False,
    **options,
):
    """EasyEdit's ``BaseEditor.edit`` on this project's editor: ``(metrics, edited_model, weights_copy)``.

    ``metrics`` holds one dict per request in EasyEdit's layout: ``case_id``, ``requested_rewrite``, ``time`` and
    ``pre`` / ``post`` with ``rewrite_acc`` and ``rephrase_acc`` (lists, one value per prompt),
    ``portability`` (``{"<name>_acc": [...]}``: the ground truth's teacher-forced token accuracy) and, after the
    edit, ``locality`` (``{"<name>_acc": [...]}``: the fraction of the locality prompt's argmax tokens, with its
    ground truth teacher-forced, that the edit left unchanged). ``sequential_edit=False`` edits each request alone
    on the unedited model (the returned model holds the last one); ``True`` applies them one after another and
    measures them all at the end. ``ground_truth`` and ``subject`` are recorded (the editor does not need them).
    ``weights_copy`` maps the edited weights' names to copies of their unedited values (the base model itself is
    never changed). EasyEdit's ``options`` that have no effect here (:data:`EASYEDIT_OPTIONS`: the base model is
    never changed, metrics are always computed) are accepted, so that its scripts run unchanged; any other keyword
    is a ``TypeError``.
    """
    unknown = sorted(set(options) - set(EASYEDIT_OPTIONS))
    if unknown:
        raise TypeError(f"Editor.edit() got unexpected keyword argument(s) {', '.join(unknown)}.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    targets = _per_request(target_new, n, "target_new")
    truths = _per_request(ground_truth, n, "ground_truth")
    subjects = _per_request(subject, n, "subject")
    rephrases = _per_request(rephrase_prompts, n, "rephrase_prompts")
    locality = _named_inputs(locality_inputs, n, "locality_inputs")
    portability = _named_inputs(portability_inputs, n, "portability_inputs")

    def score(model, prompt, target):
        return editor.score(model, [_ids(editor, prompt, target)])[0]

    def measure(model, i, pre_locality=None):
        out = {"rewrite_acc": [score(model, prompts[i], targets[i]).accuracy]}
        if rephrases[i] is not None:
            out["rephrase_acc"] = [score(model, rephrases[i], targets[i]).accuracy]
        out["portability"] = {f"{k}_acc": [score(model, *v[i]).accuracy] for k, v in portability.items()}
        tokens = {k: score(model, *v[i]).argmax for k, v in locality.items()}
        if pre_locality is None:
            out["locality"] = {k: {"output": t} for k, t in tokens.items()}
        else:
            out["locality"] = {
                f"{k}_acc": [sum(a == b for a, b in zip(t, pre_locality[k]["output"])) / max(1, len(t))]
                for k, t in tokens.items()
            }
        return out

    base = editor.base()
    pre = [measure(base, i) for i in range(n)]
    weights_copy = {name: base.base.get_parameter(name).detach().clone() for name in editor.inner_params}
    current = base.copy()
    metrics, posts = [], [None] * n
    for i in range(n):
        start = time.perf_counter()
        request = EditRequest(prompts[i], targets[i])
        model = current if sequential_edit else base.copy()
        model.push(editor.edit_patch(model, [editor.tokenize(request)], [request]))
        seconds = time.perf_counter() - start
        if not sequential_edit:
            posts[i] = measure(model, i, pre[i]["locality"])
            current = model
        metrics.append(
            {
                "case_id": i,
                "requested_rewrite": {
                    "prompt": prompts[i],
                    "target_new": targets[i],
                    "ground_truth": truths[i],
                    "subject": subjects[i],
                    "rephrase_prompt": rephrases[i],
                },
                "time": seconds,
                "pre": pre[i],
            }
        )
    if sequential_edit:
        posts = [measure(current, i, pre[i]["locality"]) for i in range(n)]
    for m, post in zip(metrics, posts):
        m["post"] = post
    return metrics, current, weights_copy
