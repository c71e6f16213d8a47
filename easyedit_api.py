"""EasyEdit's ``BaseEditor`` surface on this project's editors (:meth:`editing.Editor.edit` and
:meth:`editing.Editor.batch_edit`), checked against EasyEdit's ``easyeditor/editors/editor.py`` (its commit 14cea82):
its argument names, order and meanings, its request dicts (``requested_rewrite``), its metrics layout and its printed
summary, so that an EasyEdit script runs with an editor trained here by changing its import and its constructor.

Per request, before (``pre``) and after (``post``) the edit, as EasyEdit's teacher-forced evaluation computes them:

- ``rewrite_acc`` / ``rephrase_acc``: for each prompt, the fraction of ``target_new``'s tokens that are the argmax
  prediction with the target teacher-forced (a list, one value per prompt);
- ``portability``: ``{"<name>_acc": [...]}``, the same accuracy of each portability prompt's ground truth;
- ``locality``: ``{"<name>_output": [[token ids], ...]}``, each locality prompt's argmax tokens with its ground truth
  teacher-forced; after the edit also ``"<name>_acc"``, per prompt the fraction of those tokens that the edit left
  as they were before it;
- ``fluency`` (``test_generation=True``): ``{"ngram_entropy": ...}``, ROME's generation entropy
  (:func:`fact_metrics.n_gram_entropy`) of the rewrite prompt's greedy continuation, prompt included, up to
  :data:`FLUENCY_TOKENS` tokens in all (EasyEdit samples from the top 5 tokens; greedy decoding here makes the figure
  repeatable);
- ``metric_meta``: how each figure was computed, EasyEdit's protocol names.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, List, Optional, Sequence

from data_classes.requests import EditRequest
from fact_metrics import n_gram_entropy

LOG = logging.getLogger("edit.easyedit")
FLUENCY_TOKENS = 100  # EasyEdit's max_out_len of the fluency test: prompt and continuation together
# EasyEdit keyword arguments honoured here (besides the named parameters of edit / batch_edit).
EDIT_OPTIONS = (
    "subject",
    "test_generation",
    "keep_original_weight",
    "eval_metric",
    "requests",
    "pre_edit",
    "pre_file",
    "summary_metrics",
)
# eval_metric values that mean EasyEdit's teacher-forced token accuracy, the one computed here.
TOKEN_METRICS = ("exact match", "token_em")
# EasyEdit keyword arguments of methods this project does not have.
NOT_HERE = {
    "train_ds": "IKE's in-context examples",
    "metric_kwargs": "EasyEdit's sentiment metrics",
    "loc_prompts": "SERAC's training prompts",
}


# -- requests ---------------------------------------------------------------------------------------------------
def _per_request(value, n: int, name: str) -> list:
    """One value per request: a list of ``n`` values, or a single value (a string) for a single request."""
    if value is None:
        return [None] * n
    values = [value] if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} prompts; give one per prompt.")
    return values


def _named_inputs(inputs: Optional[dict], n: int, name: str) -> Dict[str, list]:
    """EasyEdit's ``{"<name>": {"prompt": [...], "ground_truth": [...]}}`` as name -> [{"prompt", "ground_truth"}
    or None per request]."""
    out = {}
    for key, spec in (inputs or {}).items():
        if not isinstance(spec, dict) or "prompt" not in spec or "ground_truth" not in spec:
            raise ValueError(f"{name}[{key!r}] must be {{'prompt': [...], 'ground_truth': [...]}}.")
        single = isinstance(spec["prompt"], str)
        prompts = [spec["prompt"]] if single else spec["prompt"]
        truths = [spec["ground_truth"]] if single else spec["ground_truth"]
        prompts = _per_request(prompts, n, f"{name}[{key!r}]['prompt']")
        truths = _per_request(truths, n, f"{name}[{key!r}]['ground_truth']")
        out[key] = [None if p is None else {"prompt": p, "ground_truth": t} for p, t in zip(prompts, truths)]
    return out


def prepare_requests(
    prompts,
    target_new,
    ground_truth=None,
    target_neg=None,
    rephrase_prompts=None,
    locality_inputs: Optional[dict] = None,
    portability_inputs: Optional[dict] = None,
    subject=None,
) -> List[dict]:
    """EasyEdit's request dicts (what ``requested_rewrite`` holds): ``prompt``, ``target_new``, ``ground_truth``,
    ``portability`` and ``locality`` (``{"<name>": {"prompt", "ground_truth"}}``), and when the argument is given
    ``target_neg``, ``subject`` (it must occur in its prompt) and ``rephrase_prompt`` (None for a request without).
    A mismatch of lengths is a ``ValueError`` naming the argument; a bad prompt, target or subject an
    :class:`errors.EditRequestError`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if not n:
        raise ValueError("prompts: no prompt given.")
    columns = {
        "target_new": _per_request(target_new, n, "target_new"),
        "ground_truth": _per_request(ground_truth, n, "ground_truth"),
        "target_neg": _per_request(target_neg, n, "target_neg"),
        "subject": _per_request(subject, n, "subject"),
        "rephrase_prompt": _per_request(rephrase_prompts, n, "rephrase_prompts"),
    }
    locality = _named_inputs(locality_inputs, n, "locality_inputs")
    portability = _named_inputs(portability_inputs, n, "portability_inputs")
    requests = []
    for i, prompt in enumerate(prompts):
        EditRequest(prompt, columns["target_new"][i], subject=columns["subject"][i])  # checks prompt, target, subject
        request = {
            "prompt": prompt,
            "target_new": columns["target_new"][i],
            "ground_truth": columns["ground_truth"][i],
            "portability": {k: v[i] for k, v in portability.items() if v[i] is not None},
            "locality": {k: v[i] for k, v in locality.items() if v[i] is not None},
        }
        for key, given in (("target_neg", target_neg), ("subject", subject), ("rephrase_prompt", rephrase_prompts)):
            if given is not None:  # as EasyEdit: the key whenever the argument is given, None for a request without
                request[key] = columns[key][i]
        requests.append(request)
    return requests


# -- measuring ----------------------------------------------------------------------------------------------------
def _texts(value) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def _pairs(prompts, targets) -> List[tuple]:
    """(prompt, target) pairs: one prompt, several prompts sharing one target, or one target per prompt."""
    prompts = _texts(prompts)
    targets = [targets] * len(prompts) if isinstance(targets, str) else list(targets)
    if len(targets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(targets)} ground truths: give one per prompt.")
    return list(zip(prompts, targets))


def _meta(result_key: str, protocol: str, scorer: str, group: str) -> dict:
    return {"result_key": result_key, "protocol": protocol, "scorer": scorer, "comparable_group": group}


def _lm_protocol(editor) -> str:
    kind = editor.config.model.get("kind", "causal_lm")
    return "decoder_only_teacher_forcing" if kind == "causal_lm" else "seq2seq_teacher_forcing"


def quality(editor, model, request: dict, test_generation: bool = False) -> dict:
    """One request's figures on ``model`` (an :class:`patches.EditedModel`), EasyEdit's ``compute_edit_quality``
    layout (see the module docstring); every (prompt, target) row of the request is scored in one call."""
    rows, slots = [], []

    def add(slot, prompts, targets):
        for p, t in _pairs(prompts, targets):
            toks = editor.tokenize(EditRequest(p, t))
            rows.append((toks.prompt, toks.target))
            slots.append(slot)

    add(("rewrite",), request["prompt"], request["target_new"])
    if request.get("rephrase_prompt") is not None:
        add(("rephrase",), request["rephrase_prompt"], request["target_new"])
    for key, spec in request["locality"].items():
        add(("locality", key), spec["prompt"], spec["ground_truth"])
    for key, spec in request["portability"].items():
        add(("portability", key), spec["prompt"], spec["ground_truth"])
    protocol = _lm_protocol(editor)
    meta = {
        key: _meta(f"{key}_acc", protocol, "token_accuracy", f"lm.{protocol}.token_accuracy")
        for key in ("rewrite", "rephrase")
    }
    ret: dict = {"locality": {}, "portability": {}, "metric_meta": {"rewrite": meta["rewrite"]}}
    for slot, score in zip(slots, editor.score(model, rows)):
        if slot[0] in ("rewrite", "rephrase"):
            ret.setdefault(f"{slot[0]}_acc", []).append(score.accuracy)
            ret["metric_meta"][slot[0]] = meta[slot[0]]
        elif slot[0] == "locality":
            ret["locality"].setdefault(f"{slot[1]}_output", []).append(list(score.argmax))
        else:
            ret["portability"].setdefault(f"{slot[1]}_acc", []).append(score.accuracy)
    if test_generation:
        ret["fluency"] = {"ngram_entropy": fluency(editor, model, _texts(request["prompt"]))}
    return ret


def fluency(editor, model, prompts: Sequence[str]) -> float:
    """The mean generation entropy of the prompts' greedy continuations on ``model`` (prompt included), each
    :data:`FLUENCY_TOKENS` tokens long with its prompt, or the model's context if that is shorter."""
    config = editor.model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    limit = min(FLUENCY_TOKENS, context or FLUENCY_TOKENS)
    values = []
    for prompt in prompts:
        ids = editor.encode(prompt)
        continuation = editor.greedy(model, ids, max(1, limit - len(ids)))
        values.append(n_gram_entropy(prompt + editor.decode(continuation)))
    return sum(values) / len(values)


def finalize_locality(metric: dict, request: dict) -> None:
    """After the edit: per locality name, the fraction of each prompt's argmax tokens that the edit left as they
    were (``post["locality"]["<name>_acc"]``), as EasyEdit adds it once ``pre`` and ``post`` are known."""
    pre, post = metric["pre"]["locality"], metric["post"]["locality"]
    for key in request["locality"]:
        before, after = pre[f"{key}_output"], post[f"{key}_output"]
        post[f"{key}_acc"] = [sum(a == b for a, b in zip(x, y)) / max(1, len(x)) for x, y in zip(before, after)]
        metric["post"]["metric_meta"][f"locality.{key}"] = _meta(
            f"locality.{key}_acc",
            "pre_post_argmax_token_match",
            "token_match",
            "locality.lm.pre_post_argmax_token_match",
        )


# -- the printed summary ------------------------------------------------------------------------------------------
def _mean(values) -> Optional[float]:
    flat = [float(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]
    return sum(flat) / len(flat) if flat else None


def summary_metrics(all_metrics: Sequence[dict], show: bool = True) -> dict:
    """EasyEdit's summary of a list of metrics: per ``pre`` / ``post``, the mean of ``rewrite_acc``,
    ``rephrase_acc`` (over every value), and of each ``locality`` / ``portability`` accuracy (the mean per request,
    then over requests), and the protocols each figure was computed with. ``show``: print it as EasyEdit does
    (``Metrics Summary:  {...}``)."""
    if isinstance(all_metrics, dict):
        all_metrics = [all_metrics]
    summary: dict = {}
    for when in ("pre", "post"):
        summary[when] = {}
        for key in ("rewrite_acc", "rephrase_acc", "rewrite_ppl", "ood_acc"):
            value = _mean(m[when][key] for m in all_metrics if key in m.get(when, {}))
            if value is not None:
                summary[when][key] = value
        for section in ("locality", "portability"):
            parts = [m.get(when, {}).get(section, {}) for m in all_metrics]
            keys = sorted({k for p in parts for k in p if k.endswith("acc")})
            if keys:
                summary[when][section] = {k: _mean(_mean(p[k]) for p in parts if k in p) for k in keys}
    protocols: Dict[str, set] = {}
    for m in all_metrics:
        for when in ("pre", "post"):
            for section, meta in m.get(when, {}).get("metric_meta", {}).items():
                protocols.setdefault(f"{when}.{section}", set()).add(meta.get("comparable_group", "unknown"))
    if protocols:
        summary["metric_protocols"] = {k: sorted(v) for k, v in sorted(protocols.items())}
        if show:
            print("Metric Protocol Summary: ", summary["metric_protocols"])
    if show:
        print("Metrics Summary: ", summary)
    return summary


# -- editing ------------------------------------------------------------------------------------------------------
def _check_options(kwargs: dict, allowed: Sequence[str]) -> None:
    for key in kwargs:
        if key in NOT_HERE:
            raise TypeError(f"{key}= ({NOT_HERE[key]}) has no counterpart for this project's editors; leave it out.")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}; EasyEdit's options taken here: {', '.join(allowed)}."
        )
    metric = kwargs.get("eval_metric", TOKEN_METRICS[0])
    if metric not in TOKEN_METRICS:
        raise ValueError(f"eval_metric={metric!r}: only EasyEdit's token accuracy ({' or '.join(TOKEN_METRICS)}).")


def _originals(editor) -> dict:
    """Copies of the edited weights' current values (EasyEdit's ``weights_copy``)."""
    return {name: editor.model.get_parameter(name).detach().clone() for name in editor.inner_params}


def _plain_model(editor, model, keep_original_weight):
    """The edited model as a plain transformers model: a new copy of the base model holding the edited weights, or,
    with ``keep_original_weight=False``, the base model itself written to (EasyEdit's in-place edit)."""
    if keep_original_weight is False:
        model.apply_to(editor.model)
        return editor.model
    return model.materialize()


def _patch(editor, model, requests: Sequence[dict]):
    """The patch of one update of ``requests`` on ``model``."""
    edits = [EditRequest(r["prompt"], r["target_new"], subject=r.get("subject")) for r in requests]
    return editor.edit_patch(model, [editor.tokenize(e) for e in edits], edits)


def _log(verbose: bool, i: int, request: dict, metric: dict) -> None:
    if verbose:
        LOG.info("%d editing: %s -> %s\n%s", i, request["prompt"], request["target_new"], metric)


def edit(
    editor,
    prompts,
    target_new,
    ground_truth=None,
    target_neg=None,
    rephrase_prompts=None,
    locality_inputs: Optional[dict] = None,
    portability_inputs: Optional[dict] = None,
    sequential_edit: bool = False,
    verbose: bool = True,
    **kwargs,
):
    """EasyEdit's ``BaseEditor.edit``: one request after another; returns ``(metrics, edited_model, weights_copy)``.

    ``metrics``: one dict per request, ``{"pre", "case_id", "requested_rewrite", "time", "post"}`` (module docstring),
    and the summary is printed. ``sequential_edit=False`` edits each request alone on the unedited model (the model
    returned holds the last one); ``True`` edits each on the model the earlier ones edited and measures it right
    after its own edit, as EasyEdit does. ``edited_model`` is a plain transformers model: a new one, the base model
    unchanged, unless ``keep_original_weight=False`` is given, which writes the edits into the base model itself
    (``editor.model``, returned) as EasyEdit's in-place edit does. ``weights_copy``: the edited weights' values before
    the call, to restore them. Keyword options (:data:`EDIT_OPTIONS`): ``subject``, ``test_generation`` (fluency),
    ``keep_original_weight``, ``eval_metric`` (token accuracy only), ``requests`` (prepared request dicts instead of
    the lists), ``pre_edit`` (the ``pre`` metrics of an earlier call, not recomputed), ``pre_file`` (write the
    ``pre`` metrics there as JSON), ``summary_metrics`` (no effect: the summary is always printed); any other is a
    ``TypeError``."""
    _check_options(kwargs, EDIT_OPTIONS)
    requests = kwargs.get("requests")
    if requests is None:
        requests = prepare_requests(
            prompts,
            target_new,
            ground_truth,
            target_neg,
            rephrase_prompts,
            locality_inputs,
            portability_inputs,
            subject=kwargs.get("subject"),
        )
    test_generation = bool(kwargs.get("test_generation", False))
    keep = kwargs.get("keep_original_weight")
    weights_copy = _originals(editor)
    editor.start_sequence()
    base = editor.base()
    if kwargs.get("pre_edit") is not None:
        all_metrics = [dict(m) for m in kwargs["pre_edit"]]
        if len(all_metrics) != len(requests):
            raise ValueError(f"pre_edit: {len(all_metrics)} metrics for {len(requests)} requests.")
    else:
        all_metrics = [{"pre": quality(editor, base, r, test_generation)} for r in requests]
    if kwargs.get("pre_file"):
        with open(kwargs["pre_file"], "w", encoding="utf-8") as f:
            json.dump(all_metrics, f, indent=4, ensure_ascii=False)
    current = base
    for i, request in enumerate(requests):
        if not sequential_edit:
            editor.start_sequence()
        model = (current if sequential_edit else base).copy()
        start = time.perf_counter()
        model.push(_patch(editor, model, [request]))
        seconds = time.perf_counter() - start
        metric = all_metrics[i]
        metric.update(case_id=i, requested_rewrite=request, time=seconds)
        metric["post"] = quality(editor, model, request, test_generation)
        finalize_locality(metric, request)
        _log(verbose, i, request, metric)
        current = model
    summary_metrics(all_metrics)
    return all_metrics, _plain_model(editor, current, keep), weights_copy


def batch_edit(
    editor,
    prompts,
    target_new,
    ground_truth=None,
    target_neg=None,
    rephrase_prompts=None,
    locality_inputs: Optional[dict] = None,
    portability_inputs: Optional[dict] = None,
    sequential_edit: bool = False,
    verbose: bool = True,
    **kwargs,
):
    """EasyEdit's ``BaseEditor.batch_edit``: the requests in chunks of ``editor.hparams.data.n_edits`` (the edits
    per update the editor was trained for; EasyEdit's ``hparams.batch_size``), each chunk in one update; returns
    ``(metrics, edited_model, weights_copy)`` of the last chunk's model. Per chunk, ``pre`` is measured on the model
    the chunk is applied to (the unedited model, or with ``sequential_edit=True`` the one the earlier chunks edited),
    ``post`` after its update; ``case_id`` counts within the chunk and ``time`` is the chunk's, as in EasyEdit.
    Keyword options: ``subject``, ``test_generation``, ``keep_original_weight`` (as :func:`edit`); no summary is
    printed."""
    allowed = ("subject", "test_generation", "keep_original_weight", "eval_metric")
    _check_options(kwargs, allowed)
    requests = prepare_requests(
        prompts,
        target_new,
        ground_truth,
        target_neg,
        rephrase_prompts,
        locality_inputs,
        portability_inputs,
        subject=kwargs.get("subject"),
    )
    test_generation = bool(kwargs.get("test_generation", False))
    size = max(1, int(editor.config.data.get("n_edits", 1)))
    weights_copy = _originals(editor)
    editor.start_sequence()
    current = base = editor.base()
    all_metrics: List[dict] = []
    for s in range(0, len(requests), size):
        chunk = requests[s : s + size]
        model = current if sequential_edit else base
        if not sequential_edit:
            editor.start_sequence()
        metrics = [
            {"case_id": i, "requested_rewrite": r, "pre": quality(editor, model, r, test_generation)}
            for i, r in enumerate(chunk)
        ]
        edited = model.copy()
        start = time.perf_counter()
        edited.push(_patch(editor, edited, chunk))
        seconds = time.perf_counter() - start
        for i, (metric, request) in enumerate(zip(metrics, chunk)):
            metric["time"] = seconds
            metric["post"] = quality(editor, edited, request, test_generation)
            finalize_locality(metric, request)
            _log(verbose, i, request, metric)
        all_metrics += metrics
        current = edited
    return all_metrics, _plain_model(editor, current, kwargs.get("keep_original_weight")), weights_copy
