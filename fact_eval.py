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
  The metric definitions and a case's record are in ``fact_metrics``.
- EasyEdit's teacher-forced token accuracies (Yao et al., 2023, "Editing Large Language Models: Problems, Methods,
  and Opportunities"; EasyEdit's ``compute_rewrite_or_rephrase_quality`` and ``compute_locality_quality``):
  ``rewrite_acc`` and ``rephrase_acc``, the fraction of ``target_new``'s tokens that are the argmax prediction after
  the rewrite and paraphrase prompts; ``locality``, the fraction of the neighborhood prompts' argmax tokens (with
  ``target_true`` teacher-forced) that the edit leaves unchanged.

- Beyond them, for many edits: the greedy check (``generative``: the greedy continuation of the rewrite prompt
  starts with the new target's tokens; ``generative_paraphrase`` for the paraphrases), the neighbourhood score as a
  share of the unedited model's (``neighborhood_share``), and in sequential runs the retention of the first
  ``retention`` edits of each group: the share of them whose rewrite prompt prefers the new target right after their
  own update (``held_when_applied``), after the whole group (``held_at_end``), and of the first, the share still
  holding at the end (``retained``).

Modes: ``single`` edits each case alone on the unedited model; ``batched`` applies groups of ``n_edits`` cases in
one update; ``sequential`` applies ``n_edits`` cases one update after another, each update (``edits_per_step``
cases, default 1) on the model the previous ones edited. In the last two every case is measured once its whole
group is applied, so the drop with ``n_edits`` shows. Each group starts from the unedited model and the editor as
loaded (:meth:`editing.Editor.start_sequence`). The rows of all cases are scored with :class:`scoring.RowScorer`:
once on the unedited model, then a group's rows together on the model the group edited.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

from data_classes.counterfact import load_split
from data_classes.gen import context_length
from data_classes.requests import EditRequest
from errors import EditRequestError
from eval_progress import (
    SAVE_SECONDS,
    EvaluationStopped,
    RunProgress,
    progress_path,
    read_progress_meta,
    remove_progress,
    run_identity,
)
from fact_metrics import TfIdf, case_record, case_rows, case_summary, generation_metrics, summarize
from fact_report import LAYOUTS, plot_fact_curve, run_name, summary_table, warning_lines, write_rome_cases
from preflight import MAX_PROMPT_TOKENS, check_prompt_lengths
from progress import ProgressBars
from scoring import RowScorer
from utils import atomic_write_text

MODES = ("single", "batched", "sequential")
Progress = Optional[Callable[[str, int, int], None]]  # (stage, done, total)


class PreparedCases:
    """Cases with their scored rows and their records on the unedited model (``pre``): what every run on these
    cases shares. ``paraphrases`` / ``neighbors``: score at most that many of each case's paraphrase / neighbourhood
    prompts (None: all). ``progress(stage, done, total)`` is told how the unedited model's pass advances. A prompt
    longer than the model's context is refused before any scoring; ``warnings`` names the cases with prompts above
    ``max_prompt_tokens``."""

    def __init__(
        self,
        editor,
        cases: Sequence[dict],
        generation: bool = False,
        gen_tokens: int = 50,
        reference_corpus: Optional[Sequence[str]] = None,
        progress: Progress = None,
        paraphrases: Optional[int] = None,
        neighbors: Optional[int] = None,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    ):
        self.editor, self.cases = editor, list(cases)
        self.generation, self.gen_tokens = generation, gen_tokens
        corpus = reference_corpus
        if generation and corpus is None:
            corpus = [t for c in self.cases for t in c.get("reference_texts", [])]
        self.tfidf = TfIdf(corpus) if generation else None
        rows, self.spans = [], []
        for case in self.cases:
            case_rows_, index = case_rows(editor, case, paraphrases, neighbors)
            self.spans.append((len(rows), index))
            rows += case_rows_
        self.warnings = self._check_lengths(rows, max_prompt_tokens)
        self.scorer = RowScorer(editor, rows)
        done = [0]

        def tick(n):
            done[0] += n
            progress("unedited model", done[0], len(rows))

        scores = self.scorer.score_base(tick if progress else None)
        self.pre = [case_record(index, scores[s : s + len(index)]) for s, index in self.spans]
        if generation:
            for record, gen in zip(self.pre, self.generations(editor.base(), range(len(self.cases)))):
                record.update(gen)

    def _check_lengths(self, rows, limit: int) -> List[str]:
        """Refuse a case whose prompt and target do not fit the model's context; one warning line for the cases
        with one longer than ``limit``."""
        context, over = context_length(self.editor.model), []
        for case, (start, index) in zip(self.cases, self.spans):
            texts = [(kind[:-1].replace("_", " "), sum(map(len, rows[start + j]))) for j, (kind, _) in enumerate(index)]
            if check_prompt_lengths(texts, context, limit, where=f"case {case['case_id']}"):
                over.append(str(case["case_id"]))
        if not over:
            return []
        shown = ", ".join(over[:5]) + (", ..." if len(over) > 5 else "")
        return [f"{len(over)} case(s) have prompts above --max-prompt-tokens {limit} tokens (case ids {shown})"]

    def rows_of(self, cases: Sequence[int], kind: Optional[str] = None, which: Optional[str] = None) -> List[int]:
        """The row indices of ``cases``, optionally only one prompt kind and one target."""
        out = []
        for c in cases:
            start, index = self.spans[c]
            out += [start + j for j, (k, w) in enumerate(index) if kind in (None, k) and which in (None, w)]
        return out

    def records(self, model, cases: Sequence[int]) -> List[dict]:
        """The records of ``cases`` on ``model``, their rows scored together (and their generations with
        ``generation``)."""
        scores = iter(self.scorer.score(model, self.rows_of(cases)))
        out = [case_record(self.spans[c][1], [next(scores) for _ in self.spans[c][1]]) for c in cases]
        if self.generation:
            for record, gen in zip(out, self.generations(model, cases)):
                record.update(gen)
        return out

    def generations(self, model, cases: Sequence[int]) -> List[dict]:
        return generation_metrics(self.editor, model, [self.cases[c] for c in cases], self.tfidf, self.gen_tokens)

    def rewrite_holds(self, model, cases: Sequence[int]) -> List[bool]:
        """Per case, whether ``model`` prefers the new target on the rewrite prompt (lower NLL per token)."""
        new = self.scorer.score(model, self.rows_of(cases, "rewrite_prompts", "target_new"))
        true = self.scorer.score(model, self.rows_of(cases, "rewrite_prompts", "target_true"))
        return [a.nll < b.nll for a, b in zip(new, true)]


def pre_edit_metrics(
    editor,
    cases: Sequence[dict],
    generation: bool = False,
    gen_tokens: int = 50,
    reference_corpus: Optional[Sequence[str]] = None,
) -> List[dict]:
    """Every case's record on the unedited model (the ``pre`` records of :func:`evaluate`)."""
    return PreparedCases(editor, cases, generation, gen_tokens, reference_corpus).pre


def _request(case: dict) -> EditRequest:
    return EditRequest(case["prompt"].format(case["subject"]), case["target_new"], subject=case["subject"])


def evaluate(
    editor,
    cases: Sequence[dict],
    mode: str = "single",
    n_edits: int = 1,
    generation: bool = False,
    gen_tokens: int = 50,
    progress: Progress = None,
    prepared: Optional[PreparedCases] = None,
    reference_corpus: Optional[Sequence[str]] = None,
    edits_per_step: int = 1,
    retention: int = 100,
    saved: Optional[Callable[[str, int, int, int], RunProgress]] = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Edit with ``editor`` (an :class:`editing.Editor`) and measure every case before and after; see the module
    docstring for the modes and figures. Returns ``{"mode", "n_edits", "edits_per_step", "summary", "cases"}``; the
    base model is left unedited. ``prepared``: the cases' rows and unedited records (:class:`PreparedCases` of the
    same cases and arguments), shared by several runs; built here when not given. ``reference_corpus``: the texts
    consistency's inverse document frequencies are fitted on (default: the reference texts of ``cases``); pass the
    whole data set's so that the figure does not depend on how many cases are evaluated. ``progress(stage, done,
    total)`` is told of the edits applied. ``saved(mode, n_edits, edits_per_step, retention)``: the run's
    :class:`eval_progress.RunProgress`; the run continues from what it holds and writes its progress there after an
    update when it is due, or when ``should_stop()`` turns true (then :class:`eval_progress.EvaluationStopped` is
    raised); the caller discards it once the run's results are written."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}.")
    size = 1 if mode == "single" else int(n_edits)
    if size < 1 or int(edits_per_step) < 1:
        raise ValueError(f"n_edits={n_edits}, edits_per_step={edits_per_step}: both must be at least 1.")
    step = size if mode == "batched" else min(int(edits_per_step), size) if mode == "sequential" else 1
    if prepared is None:
        prepared = PreparedCases(editor, cases, generation, gen_tokens, reference_corpus)
    elif len(prepared.cases) != len(cases):
        raise ValueError(f"prepared: {len(prepared.cases)} cases for {len(cases)} cases.")
    base = editor.base()
    state = {"start": 0, "offset": 0, "seconds": 0.0, "edit_seconds": 0.0, "eval_seconds": 0.0}
    state.update(results=[], when_applied=[], at_end=[])
    store = saved(mode, size, step, retention) if saved is not None else None
    restored = store.load(base.base_identity) if store is not None else None
    if restored is not None:
        state.update(restored["state"])
    results, when_applied, at_end = state["results"], state["when_applied"], state["at_end"]

    def keep(start: int, offset: int, seconds: float, current) -> None:
        """Write the run's progress when it is due or a stop is asked for; stop then."""
        stopping = should_stop()
        if store is None or not (stopping or store.due()):
            return
        state.update(start=start, offset=offset, seconds=seconds)
        weights = current.weights if offset else {}
        store.save(state, weights, editor.alg.lifelong_state() if offset else {}, base.base_identity)
        if stopping:
            raise EvaluationStopped(store.path, start + offset, len(cases))

    for start in range(state["start"], len(cases), size):
        group = list(range(start, min(start + size, len(cases))))
        editor.start_sequence()
        current = base.copy()
        seconds, offset = 0.0, 0
        if restored is not None and start == state["start"] and state["offset"]:
            current.restore_weights(restored["weights"], {"resumed_after": state["offset"]})
            if restored["editor"]:
                editor.alg.load_lifelong_state(restored["editor"])
            seconds, offset = state["seconds"], state["offset"]
        for s in range(offset, len(group), step):
            part = group[s : s + step]
            requests = [_request(cases[i]) for i in part]
            t0 = time.perf_counter()
            current.push(editor.edit_patch(current, [editor.tokenize(r) for r in requests], requests))
            seconds += time.perf_counter() - t0
            watched = [i for i in part if i - start < retention]
            if mode == "sequential" and len(group) > step and watched:
                t0 = time.perf_counter()
                when_applied += prepared.rewrite_holds(current, watched)
                state["eval_seconds"] += time.perf_counter() - t0
            if progress is not None:
                progress("edits", start + s + len(part), len(cases))
            if s + len(part) < len(group):
                keep(start, s + len(part), seconds, current)
        state["edit_seconds"] += seconds
        t0 = time.perf_counter()
        posts = prepared.records(current, group)
        state["eval_seconds"] += time.perf_counter() - t0
        for i, post in zip(group, posts):
            results.append(_case_result(cases[i], seconds / len(group), prepared.pre[i], post))
            if mode == "sequential" and len(group) > step and i - start < retention:
                at_end.append(results[-1]["summary"]["post_efficacy_score"] == 1.0)
        if group[-1] + 1 < len(cases):
            keep(group[-1] + 1, 0, 0.0, current)
    edit_seconds, eval_seconds = state["edit_seconds"], state["eval_seconds"]
    summary = summarize(results)
    summary.update(
        target_less_likely=sum(bool(r["warnings"]) for r in results),
        edit_seconds=edit_seconds,
        edits_per_second=len(cases) / edit_seconds if edit_seconds > 0 else None,
        eval_seconds=eval_seconds,
    )
    if when_applied:
        kept = [b for a, b in zip(when_applied, at_end) if a]
        summary.update(
            held_when_applied=sum(when_applied) / len(when_applied),
            held_at_end=sum(at_end) / len(at_end),
            retained=sum(kept) / len(kept) if kept else None,
            retention_edits=len(at_end),
        )
    return {"mode": mode, "n_edits": size, "edits_per_step": step, "summary": summary, "cases": results}


def _case_result(case: dict, seconds: float, pre: dict, post: dict) -> dict:
    before, after = (r["rewrite_prompts_probs"][0]["target_new"] for r in (pre, post))  # NLL per token
    warnings = []
    if after > before:
        warnings.append(f"the edit made its own target less likely (NLL per token {before:.2f} -> {after:.2f})")
    return {
        "case_id": case["case_id"],
        "requested_rewrite": {
            **{k: case[k] for k in ("prompt", "subject", "target_new", "target_true")},
            "relation_id": case.get("relation_id", ""),
        },
        "time": seconds,
        "pre": pre,
        "post": post,
        "summary": case_summary(pre, post),
        "warnings": warnings,
    }


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
    edits_per_step: int = 1,
    cases_per_size: Optional[int] = None,
    progress: Progress = None,
    paraphrases: Optional[int] = None,
    neighbors: Optional[int] = None,
    layout: str = "run",
    say: Callable[[str], None] = lambda line: None,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    resume: bool = False,
    save_seconds: float = SAVE_SECONDS,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """``python -m edit eval``: the first ``n`` cases of ``split`` (``train``, ``validation`` or ``all``) of the
    CounterFact-format set at ``path`` (a file or ``hf:<dataset id>``; default: the embedded set of the editor's
    configuration), evaluated with :func:`evaluate` once per ``(mode, n_edits)`` of ``plan``, all runs sharing one
    pass over the unedited model. ``cases_per_size``: a run of group size N evaluates the first max(N,
    cases_per_size) cases (rounded down to whole groups) instead of all ``n``, so that a curve from 1 to 10,000 edits
    does not make 10,000 single edits. ``paraphrases`` / ``neighbors``: score at most that many paraphrase /
    neighbourhood prompts per case (None: all), to size the scoring of many cases. Consistency's inverse document
    frequencies come from the reference texts of the whole data set, so that the figure does not depend on ``n`` or
    ``split``. ``out_dir``: one JSON per run (``<mode>.json``, ``<mode>-<n_edits>.json`` or
    ``sequential-<n_edits>-by-<edits_per_step>.json``, written as each run ends; with ``layout="rome"`` a directory of
    that name per run holding ROME's ``case_<id>.json`` files instead, :func:`fact_report.write_rome_cases`) and
    ``summary.md``; ``plot``: a PNG
    of :func:`fact_report.plot_fact_curve` (with more than one run). ``say(line)`` is told what is about to be
    read and scored; prompts longer than the model's context are refused before any scoring, and ``warnings`` lists
    cases with prompts above ``max_prompt_tokens`` and edits that made their own target less likely. With
    ``out_dir``, each run writes its progress to ``<run name>.progress.safetensors`` there every ``save_seconds`` and
    when ``should_stop()`` turns true (:mod:`eval_progress`); ``resume``: continue a run from that file, and take the
    runs whose JSON is already there (``layout="run"``) as they are, instead of starting over. Returns
    ``{"n_cases", "runs", "table", "warnings", "plot", "prepare_seconds", "resumed"}``, ``plot`` the file written or
    None, ``resumed`` the names of the runs continued or taken from ``out_dir``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}.")
    data_cfg = editor.config.data.copy()
    data_cfg.path = path
    cache_dir = os.path.expanduser(cache_dir or editor.config.cache_dir)
    seed = editor.config.seed
    own_bars = ProgressBars() if progress is None else None  # bars on a terminal by default, as the command shows
    progress = progress or own_bars
    say(f"eval: reading {path or 'the embedded CounterFact set (built into the cache once)'}")
    read = {part: load_split(data_cfg, part, seed, cache_dir) for part in ("train", "validation")}
    loaded = {part: records for part, (records, _) in read.items()}
    parts = ("validation", "train") if split == "all" else (split,)  # held-out cases first
    cases = [c for part in parts for c in loaded[part]][:n]
    biggest = max((size for mode, size in plan if mode != "single"), default=1)
    if biggest > len(cases):
        raise EditRequestError(
            f"{biggest} edits per group need as many cases; {len(cases)} are available (--n, --split)."
        )

    def used(mode: str, size: int) -> int:
        size = 1 if mode == "single" else size
        wanted = len(cases) if cases_per_size is None else max(size, cases_per_size)
        return min(len(cases), wanted) // size * size

    cases = cases[: max(used(m, s) for m, s in plan)]
    corpus = [t for records in loaded.values() for c in records for t in c.get("reference_texts", [])]
    sources = ", ".join(sorted({read[part][1] for part in parts}))
    runs_text = ", ".join(m if m == "single" else f"{m} x{size}" for m, size in plan)
    say(f"eval: {len(cases)} cases of {sources}: the unedited model first, then {runs_text}")
    t0 = time.perf_counter()
    prepared = PreparedCases(
        editor, cases, generation, gen_tokens, corpus, progress, paraphrases, neighbors, max_prompt_tokens
    )
    prepare_seconds = time.perf_counter() - t0
    runs, resumed = [], []
    for mode, size in plan:
        k = used(mode, size)
        name = run_name(_run_key(mode, size, edits_per_step))
        if resume and out_dir and layout == "run" and os.path.exists(os.path.join(out_dir, f"{name}.json")):
            runs.append(_finished_run(os.path.join(out_dir, f"{name}.json"), cases[:k]))
            resumed.append(name)
            say(f"eval: {name} is finished in {out_dir}; its results are read, not recomputed")
            continue
        saved = None
        if out_dir:
            path = progress_path(out_dir, name)
            if not resume:
                remove_progress(path)  # a run started afresh

            def saved(m, n, st, r, path=path, k=k):
                return RunProgress(path, run_identity(editor, m, n, st, r, cases[:k]), save_seconds)

            if os.path.exists(path):
                done = read_progress_meta(path)["state"]
                say(f"eval: continuing {name} after {done['start'] + done['offset']} of {k} edits ({path})")
                resumed.append(name)
        sub = prepared if k == len(cases) else _subset(prepared, k)
        run = evaluate(
            editor, cases[:k], mode, size, generation, gen_tokens, progress, sub, corpus, edits_per_step,
            saved=saved, should_stop=should_stop,
        )  # fmt: skip
        runs.append(run)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            if layout == "rome":
                write_rome_cases(run, os.path.join(out_dir, run_name(run)))
            else:
                text = json.dumps(run, indent=1, ensure_ascii=False)  # written as each run ends, through a temp file
                atomic_write_text(text, os.path.join(out_dir, f"{run_name(run)}.json"))
            remove_progress(progress_path(out_dir, name))
    table = summary_table(runs)
    warnings = prepared.warnings + warning_lines(runs)
    if out_dir:
        notes = "".join(f"\nwarning: {w}\n" for w in warnings)
        atomic_write_text(table + "\n" + notes, os.path.join(out_dir, "summary.md"))
    if own_bars is not None:
        own_bars.close()
    drawn = None
    if plot and len(runs) > 1:
        plot_fact_curve(runs, plot)
        drawn = plot
    return {
        "n_cases": len(cases),
        "runs": runs,
        "table": table,
        "warnings": warnings,
        "plot": drawn,
        "prepare_seconds": prepare_seconds,
        "resumed": resumed,
    }


def _run_key(mode: str, size: int, edits_per_step: int) -> dict:
    """The mode, group size and edits per update a run of :func:`evaluate` records (what names its files)."""
    size = 1 if mode == "single" else int(size)
    step = size if mode == "batched" else min(int(edits_per_step), size) if mode == "sequential" else 1
    return {"mode": mode, "n_edits": size, "edits_per_step": step}


def output_files(plan: Sequence[Tuple[str, int]], edits_per_step: int = 1, layout: str = "run") -> List[str]:
    """What :func:`evaluate_dataset` writes into its ``out_dir`` for ``plan``: a JSON file a run (``layout="rome"``:
    a directory of case files) and summary.md."""
    names = [run_name(_run_key(mode, size, edits_per_step)) for mode, size in plan]
    return [f"{n}.json" if layout == "run" else n for n in names] + ["summary.md"]


def progress_files(plan: Sequence[Tuple[str, int]], edits_per_step: int = 1) -> List[str]:
    """The progress files :func:`evaluate_dataset` may leave in its ``out_dir`` for ``plan`` (an unfinished run's)."""
    return [os.path.basename(progress_path("", run_name(_run_key(m, s, edits_per_step)))) for m, s in plan]


def _finished_run(path: str, cases: Sequence[dict]) -> dict:
    """A run's results read back from its JSON (a resumed plan), checked to be of the same cases."""
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        ids = [str(c["case_id"]) for c in run["cases"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EditRequestError(
            f"{path}: not a readable run ({type(e).__name__}: {e}); delete it to run it again."
        ) from None
    if ids != [str(c["case_id"]) for c in cases]:
        raise EditRequestError(
            f"{path} holds a run of other cases ({len(ids)}) than these ({len(cases)}: --n, --split, --path, "
            "--cases-per-size); delete it to run it again, or choose another --out."
        )
    return run


def _subset(prepared: PreparedCases, k: int) -> PreparedCases:
    """The first ``k`` cases of ``prepared``, sharing its scorer (no new pass over the unedited model)."""
    sub = object.__new__(PreparedCases)
    sub.__dict__.update(prepared.__dict__)
    sub.cases, sub.spans, sub.pre = prepared.cases[:k], prepared.spans[:k], prepared.pre[:k]
    return sub
