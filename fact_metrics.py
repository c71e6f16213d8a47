"""The field's metrics of fact edits on CounterFact-format cases: what is scored for a case, the case's record, and
the figures computed from a case's records before and after editing (the definitions are in ``fact_eval``'s
docstring). The text metrics (generation entropy, TF-IDF consistency) live here too.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from statistics import harmonic_mean
from typing import Dict, List, Optional, Sequence, Tuple

from data_classes.requests import EditRequest
from losses import SequenceScore

_WORD = re.compile(r"(?u)\b\w\w+\b")
_TOKEN = re.compile(r"\w+|[^\w\s]")
# The prompts whose two targets are scored: the rewrite prompt, its paraphrases and the neighbourhood prompts (the
# attribute prompts are other subjects that hold the new object; like ROME's evaluation, no metric scores them).
PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")
Row = Tuple[List[int], List[int]]


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


# -- what is scored for a case, and its record ----------------------------------------------------------------
def case_prompts(
    case: dict, paraphrases: Optional[int] = None, neighbors: Optional[int] = None
) -> Dict[str, List[str]]:
    """The case's scored prompts by kind (:data:`PROMPT_KINDS`): the first ``paraphrases`` paraphrase prompts and
    the first ``neighbors`` neighbourhood prompts (None: all)."""
    return {
        "rewrite_prompts": [case["prompt"].format(case["subject"])],
        "paraphrase_prompts": list(case["paraphrase_prompts"])[:paraphrases],
        "neighborhood_prompts": list(case["neighborhood_prompts"])[:neighbors],
    }


def case_rows(
    editor, case: dict, paraphrases: Optional[int] = None, neighbors: Optional[int] = None
) -> Tuple[List[Row], List[Tuple[str, str]]]:
    """The (prompt ids, target ids) rows of a case (its prompts as :func:`case_prompts` chooses them), each prompt
    with ``target_new`` then ``target_true``, and for each row its (prompt kind, target) label, the order
    :func:`case_record` reads the scores in."""
    rows, index = [], []
    for kind, prompts in case_prompts(case, paraphrases, neighbors).items():
        for prompt in prompts:
            for which in ("target_new", "target_true"):
                toks = editor.tokenize(EditRequest(prompt, case[which]))
                rows.append((toks.prompt, toks.target))
                index.append((kind, which))
    return rows, index


def case_record(index: Sequence[Tuple[str, str]], scores: Sequence[SequenceScore]) -> dict:
    """A case's record on one model (ROME's layout) from the scores of its :func:`case_rows`: per prompt kind the
    mean NLL per token of each target (``<kind>_probs``), EasyEdit's token accuracies of the new target
    (``rewrite_acc``, ``rephrase_acc``), whether the greedy continuation starts with the new target's tokens
    (``rewrite_greedy``, ``rephrase_greedy``: greedy decoding emits the target exactly when every target token is the
    argmax given the tokens before it, which the teacher-forced pass reads off) and the neighbourhood prompts' argmax
    tokens with the true target teacher-forced (``neighborhood_argmax``, for EasyEdit's locality)."""
    out: dict = {f"{k}_probs": [] for k in PROMPT_KINDS}
    acc: Dict[str, list] = {k: [] for k in PROMPT_KINDS}
    greedy: Dict[str, list] = {k: [] for k in PROMPT_KINDS}
    argmax_true: Dict[str, list] = {k: [] for k in PROMPT_KINDS}
    for (kind, which), s in zip(index, scores):
        if which == "target_new":
            out[f"{kind}_probs"].append({"target_new": s.nll})
            acc[kind].append(s.accuracy)
            greedy[kind].append(s.correct)
        else:
            out[f"{kind}_probs"][-1]["target_true"] = s.nll
            argmax_true[kind].append(s.argmax)
    out["rewrite_acc"], out["rephrase_acc"] = acc["rewrite_prompts"], acc["paraphrase_prompts"]
    out["rewrite_greedy"], out["rephrase_greedy"] = greedy["rewrite_prompts"], greedy["paraphrase_prompts"]
    out["neighborhood_argmax"] = argmax_true["neighborhood_prompts"]
    return out


# -- greedy continuations -------------------------------------------------------------------------------------
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
        for key, name in (("rewrite_greedy", "generative"), ("rephrase_greedy", "generative_paraphrase")):
            if record.get(key):
                out[f"{when}_{name}"] = _mean(float(g) for g in record[key])
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
    if out.get("pre_neighborhood_score") and out.get("post_neighborhood_score") is not None:
        out["neighborhood_share"] = out["post_neighborhood_score"] / out["pre_neighborhood_score"]
    out["n_cases"] = len(cases)
    return out
