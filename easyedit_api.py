"""EasyEdit's ``BaseEditor.edit`` call on this project's editors (:meth:`editing.Editor.edit`): EasyEdit's argument
names and meanings, its metrics layout (``pre`` / ``post`` with ``rewrite_acc``, ``rephrase_acc``, ``portability``
and ``locality``), so that its scripts run with an editor trained here.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from data_classes.requests import EditRequest

# EasyEdit's BaseEditor.edit options that have no effect here (accepted so that its scripts run unchanged).
EASYEDIT_OPTIONS = ("keep_original_weight", "verbose", "test_generation", "summary_metrics", "eval_metric")


def _ids(editor, prompt: str, target: str) -> Tuple[List[int], List[int]]:
    toks = editor.tokenize(EditRequest(prompt, target))
    return toks.prompt, toks.target


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

    editor.start_sequence()
    base = editor.base()
    pre = [measure(base, i) for i in range(n)]
    weights_copy = {name: base.base.get_parameter(name).detach().clone() for name in editor.inner_params}
    current = base.copy()
    metrics, posts = [], [None] * n
    for i in range(n):
        start = time.perf_counter()
        request = EditRequest(prompts[i], targets[i])
        if not sequential_edit:
            editor.start_sequence()
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
