"""Use a trained editor (MEND, EFK or ENN: any editor of ``algs``): edit requests in, an edited model out.

From Python::

    from edit import Editor, EditRequest
    editor = Editor.from_archive("outputs/<run>")          # the training run (or its checkpoints/best.pt)
    result = editor.apply([EditRequest("The capital of Australia is", "Sydney",
                                       rephrases=["Australia's capital city is"],
                                       watch=["The capital of France is"])], mode="batched")
    print(result.table())                                    # before/after figures per request
    result.save_pretrained("edited-model")                   # loads with AutoModelForCausalLM.from_pretrained
    result.save_patches("patches")                           # one compact patch per applied edit
    model = result.model                                     # an EditedModel: base + a stack of patches
    model.revert()                                           # drop the last patch: the weights before it, bit for bit

From the shell (no Hydra: the configuration comes from the checkpoint)::

    python -m edit apply --archive outputs/<run> --requests requests.jsonl --out edited-model/ \
        [--mode batched|sequential] [--patch-out patches/] [--patch patches/ ...] [--overwrite]
    python -m edit eval-sequential --archive outputs/<run> --n 100 --checkpoints 1,10,100 [--plot seq.png]
    python -m edit eval --archive outputs/<run> [--path counterfact.json] --n 200 --mode single|batched|sequential \
        [--n-edits 1,10,100] [--generation] [--out eval/] [--plot curve.png]

A request file has one JSON object per line:
``{"prompt": "...", "target": "...", "rephrases": ["..."], "watch": ["..."]}`` (rephrases and watch optional).

Semantics:

* ``batched``: all requests in one update (their pseudo-gradients summed, as in training with data.n_edits > 1).
* ``sequential``: one request after another, each edit computed on the model already edited by the previous ones.

Either way each update is kept as a :class:`patches.Patch`: for MEND, per edited weight the factors u~ (N x d_in),
v~ (N x d_out) and the step size alpha, with W~ = W - alpha * (v~^T u~) for nn.Linear (u~^T v~ for GPT-2's Conv1D);
for an editor whose update has no low-rank form (EFK, ENN), the dense difference W - W~. The base model is never
written to: an :class:`patches.EditedModel` is the base model plus a stack of patches, and reverting a patch
recomputes the weights from the untouched base and the remaining patches. The pieces live in their own modules:
requests in ``data_classes/requests.py``, patches and the stack in ``patches.py``, the sequential experiment in
``sequential.py``, the field's metrics on CounterFact-format cases and the EasyEdit-shaped :meth:`Editor.edit` in
``fact_eval.py``; this module is the :class:`Editor` and the command line.

Exit status of the command line: 0 done; 2 a clear error (bad request file, checkpoint or model that do not fit,
output directory not empty), printed as one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from algs import ALGS, editor_class
from checkpoints import (
    check_base_model,
    checkpoint_path,
    config_from_meta,
    load_editor_state,
    read_checkpoint,
)
from data_classes.batches import prompt_target_batch
from data_classes.counterfact import load_split
from data_classes.requests import EditRequest, EditTokens, load_requests
from errors import CheckpointError, EditRequestError, PatchError, UserError
from fact_eval import MODES, easyedit_edit, plot_fact_curve, pre_edit_metrics
from fact_eval import evaluate as evaluate_facts
from fact_eval import summary_table as fact_summary_table
from losses import kl_loc_loss, sequence_log_probs
from models import get_model, get_tokenizer
from patches import EditedModel, Patch, check_output_dir, load_patches
from sequential import eval_sequential
from utils import resolve_device

LOG = logging.getLogger("edit")
# EasyEdit's BaseEditor.edit options that have no effect here (accepted so that its scripts run unchanged).
EASYEDIT_OPTIONS = ("keep_original_weight", "verbose", "test_generation", "summary_metrics", "eval_metric")

# The Python API (names defined in the modules above are re-exported here, where users import them from).
__all__ = [
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "EditedModel",
    "Editor",
    "Patch",
    "PatchError",
    "format_table",
    "load_patches",
    "load_requests",
    "main",
]


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    """What :meth:`Editor.apply` returns: the edited model, the patches applied, and per-request figures."""

    model: EditedModel
    patches: List[Patch]
    report: List[dict]
    mode: str
    tokenizer: object = None

    def materialize(self) -> torch.nn.Module:
        return self.model.materialize()

    def save_pretrained(self, out_dir: str, overwrite: bool = False) -> str:
        return self.model.save_pretrained(out_dir, self.tokenizer, overwrite, info={"report": self.report})

    def save_patches(self, out_dir: str) -> List[str]:
        os.makedirs(out_dir, exist_ok=True)
        start = len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")])
        return [p.save(os.path.join(out_dir, f"patch-{start + i:04d}.safetensors")) for i, p in enumerate(self.patches)]

    def table(self) -> str:
        return format_table(self.report)


def _show(text: str, width: int) -> str:
    s = json.dumps(text, ensure_ascii=False)
    return s if len(s) <= width else s[: width - 4] + '..."'


def format_table(report: List[dict], width: int = 32) -> str:
    """A before/after table: one line for each request's prompt, each rephrasing and each watched prompt."""
    head = ("#", "kind", "text", "target", "greedy before", "greedy after", "log p(target)", "success")
    rows = []

    def line(i, r, kind, text, item):
        return (
            str(i),
            kind,
            _show(text, width),
            _show(r["target"], 20),
            _show(item["greedy_before"], width),
            _show(item["greedy_after"], width),
            f"{item['logp_before']:.2f} -> {item['logp_after']:.2f}",
            f"{'yes' if item['success_before'] else 'no'} -> {'yes' if item['success_after'] else 'no'}",
        )

    for i, r in enumerate(report, 1):
        rows.append(line(i, r, "prompt", r["prompt"], r))
        for reph in r["rephrases"]:
            rows.append(line(i, r, "rephrase", reph["text"], reph))
        for w in r["watch"]:
            rows.append(
                (
                    str(i),
                    "watch",
                    _show(w["text"], width),
                    "",
                    _show(w["greedy_before"], width),
                    _show(w["greedy_after"], width),
                    f"KL {w['kl']:.4f}",
                    "changed" if w["changed"] else "unchanged",
                )
            )
    widths = [max(len(row[c]) for row in rows + [head]) for c in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), "  ".join("-" * w for w in widths)] + [fmt.format(*row) for row in rows]
    n = len(report)
    ok = sum(r["success_after"] for r in report)
    reph = [x["success_after"] for r in report for x in r["rephrases"]]
    watch = [x["changed"] for r in report for x in r["watch"]]
    summary = f"edit success {ok}/{n} on the prompts"
    if reph:
        summary += f", {sum(reph)}/{len(reph)} on the rephrasings"
    if watch:
        summary += f"; watched prompts whose greedy continuation changed: {sum(watch)}/{len(watch)}"
    return "\n".join(lines + ["", summary])


# ---------------------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------------------
class Editor:
    """A trained editor (any of ``algs``) with its base model and tokenizer, ready to apply edit requests."""

    def __init__(self, alg, tokenizer, config, meta: dict, path: str):
        self.alg = alg
        self.model = alg.model
        self.tokenizer = tokenizer
        self.config = config
        self.meta = meta
        self.path = path
        self.inner_params = list(config.model.inner_params)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_archive(
        cls,
        archive: str,
        device: str = "cpu",
        cache_dir: Optional[str] = None,
        model_name: Optional[str] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer=None,
        inner_params: Optional[Sequence[str]] = None,
    ) -> Editor:
        """Load a training run's editor (a run directory or a checkpoint file) and its base model.

        ``model_name`` loads the base model from another place (e.g. a directory it was moved to);
        ``model`` / ``tokenizer`` use objects already loaded. Either must be the model the editor was trained
        for: another class, other edited weights or other shapes raise :class:`errors.CheckpointError`.
        """
        path = checkpoint_path(archive)
        ckpt = read_checkpoint(path)
        meta = ckpt["meta"]
        config = config_from_meta(meta, path)
        if config.alg not in ALGS:
            raise CheckpointError(f"{path}: holds a {config.alg!r} editor, which this program does not have.")
        if inner_params is not None and list(inner_params) != list(config.model.inner_params):
            raise CheckpointError(
                f"{path}: this editor was trained to edit {list(config.model.inner_params)}, not {list(inner_params)}."
            )
        if model_name:
            old = config.model.name
            config.model.name = model_name
            if config.model.get("tokenizer_name") in (None, old):
                config.model.tokenizer_name = model_name
            if config.model.kind == "causal_lm":  # load whatever is there; the check below says if it fits
                config.model.class_name = "AutoModelForCausalLM"
        cache_dir = os.path.expanduser(cache_dir or config.cache_dir)
        given = model is not None
        if model is None:
            model = get_model(config.model, cache_dir)
        model.eval()
        model.requires_grad_(False)
        inner = list(config.model.inner_params)
        check_base_model(model, meta, inner, path)
        if tokenizer is None:
            tokenizer = get_tokenizer(config.model, cache_dir)
        model.to(resolve_device(device))
        alg = editor_class(config.alg)(model, config)
        load_editor_state(alg, ckpt["editor"], path)
        trained = alg.trained_base()
        if trained:  # ENN's train_base: edits apply to the base model as the editor trained it
            if given:  # the caller's model stays as it is
                model = copy.deepcopy(model)
                alg = editor_class(config.alg)(model, config)
                load_editor_state(alg, ckpt["editor"], path)
                trained = alg.trained_base()
            with torch.no_grad():
                for name, w in trained.items():
                    model.get_parameter(name).copy_(w)
            LOG.info("%s: the base model's parameters are the ones this editor trained (train_base).", path)
        alg.to(model.device if hasattr(model, "device") else next(model.parameters()).device)
        alg.eval()
        alg.requires_grad_(False)
        stats = alg.running_statistics()
        if stats:
            counts = {int(m.count.item()) for m in stats.values()}
            if min(counts) < 2:
                raise CheckpointError(
                    f"{path}: the editor's normalisation statistics are empty (it has seen {min(counts)} "
                    f"samples): it was never trained. Train it first (python -m run ...) and pass that run."
                )
        return cls(alg, tokenizer, config, meta, path)

    # -- tokenisation and batches -------------------------------------------------------------------------
    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, request: EditRequest) -> EditTokens:
        """Prompt and target tokenised separately (a space joins them unless one side already has it)."""
        target = request.target
        if not (target[:1].isspace() or request.prompt[-1:].isspace()):
            target = " " + target
        toks = EditTokens(
            self._encode(request.prompt),
            self._encode(target),
            [self._encode(r) for r in request.rephrases],
            [self._encode(w) for w in request.watch],
        )
        if not toks.target:
            raise EditRequestError(f"the target {request.target!r} tokenises to nothing.")
        return toks

    def _batch(self, rows: Sequence[Tuple[List[int], List[int]]]) -> dict:
        """Right-padded prompt + target rows; labels only on the target tokens."""
        return {k: v.to(self.device) for k, v in prompt_target_batch(rows, self.pad_id).items()}

    # -- measuring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model: EditedModel, rows: Sequence[Tuple[List[int], List[int]]], chunk: int = 16):
        """Per row: (log p(target | prompt) summed over target tokens, whether every target token is the argmax)."""
        out = []
        for s in range(0, len(rows), chunk):
            batch = self._batch(rows[s : s + chunk])
            lp, correct = sequence_log_probs(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            out += [(lp[r].item(), bool(correct[r].item())) for r in range(len(lp))]
        return out

    def greedy(self, model: EditedModel, prompt: List[int], n: int) -> List[int]:
        """Up to ``n`` greedy tokens after ``prompt`` on ``model`` (with a key/value cache)."""
        return model.greedy(prompt, n, self.tokenizer.eos_token_id)

    def greedy_many(self, model: EditedModel, prompts: Sequence[List[int]], n: int, chunk: int = 32) -> List[List[int]]:
        """:meth:`greedy` for each of ``prompts``, ``chunk`` prompts at a time in one left-padded batch."""
        out: List[List[int]] = []
        for s in range(0, len(prompts), chunk):
            out += model.greedy_batch(prompts[s : s + chunk], n, self.tokenizer.eos_token_id, self.pad_id)
        return out

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _measure(self, model: EditedModel, toks: List[EditTokens], watch_tokens: int) -> List[dict]:
        rows = [(t.prompt, t.target) for t in toks] + [(r, t.target) for t in toks for r in t.rephrases]
        scores = iter(self.score(model, rows))
        out = [{"prompt": next(scores)} for _ in toks]
        for o, t in zip(out, toks):
            o["rephrases"] = [next(scores) for _ in t.rephrases]
            o["greedy"] = self._decode(self.greedy(model, t.prompt, len(t.target)))
            o["greedy_rephrases"] = [self._decode(self.greedy(model, r, len(t.target))) for r in t.rephrases]
            o["watch"] = [self.greedy(model, w, watch_tokens) for w in t.watch]
        return out

    @torch.no_grad()
    def _watch_change(self, before: EditedModel, after: EditedModel, prompt: List[int], cont: List[int]) -> dict:
        x = torch.tensor([prompt + cont], device=self.device)
        pre, post = before(x, torch.ones_like(x)).float(), after(x, torch.ones_like(x)).float()
        kl = kl_loc_loss(pre, post).item()
        lp = []
        for logits in (pre, post):
            logp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], -1)
            lp.append(logp.gather(-1, x[0, len(prompt) :].unsqueeze(-1)).sum().item() if cont else 0.0)
        return {"kl": kl, "logp_before": lp[0], "logp_after": lp[1]}

    # -- editing ----------------------------------------------------------------------------------------------
    def base(self) -> EditedModel:
        """The unedited base model, as an :class:`EditedModel` with no patch."""
        return EditedModel(self.model, tokenizer=self.tokenizer)

    def edit_patch(self, current: EditedModel, toks: List[EditTokens], requests: Sequence[EditRequest] = ()) -> Patch:
        """The patch of one update for ``toks`` (all of them together), computed on the model ``current``."""
        alg = self.alg.with_weights(current.weights)
        alg.eval()
        batch = self._batch([(t.prompt, t.target) for t in toks])
        with torch.no_grad():
            edited, _ = alg.edit(batch)
        factors, alphas, layout, dense, positions = {}, {}, {}, {}, {}
        for name in self.inner_params:
            update = edited.low_rank_update(name)
            if update is None:  # an update of no low-rank form: the patch holds W - W~ itself
                before = alg.current_weight(name).detach().float()
                dense[name] = before - edited.current_weight(name).detach().float()
                continue
            u, v, alphas[name], layout[name] = update
            factors[name] = (u, v)
            positions[name] = int(u.shape[0])
        meta = {
            "model": self.config.model.name,
            "editor": self.path,
            "inner_params": self.inner_params,
            "base_model": {
                "class": type(self.model).__name__,
                "edited_weights": current._base_identity(self.inner_params),
            },
            "requests": [{"prompt": r.prompt, "target": r.target} for r in requests],
            "n_positions": positions,
        }
        return Patch(factors, alphas, layout, meta, dense)

    def apply(
        self,
        requests: Sequence[Union[EditRequest, dict]],
        mode: str = "batched",
        on: Optional[EditedModel] = None,
        watch_tokens: int = 8,
    ) -> EditResult:
        """Apply edit requests; returns the edited model, the patches and per-request figures.

        ``mode="batched"``: all requests in one update. ``mode="sequential"``: one update per request, in order,
        each computed on the model already edited by the previous ones. ``on``: an :class:`EditedModel` to edit
        further (it is left unchanged; the result holds its patches followed by the new ones).
        "before" figures are measured on ``on`` (default: the base model), "after" ones on the result.
        """
        if mode not in ("batched", "sequential"):
            raise ValueError(f"mode={mode!r}: choose 'batched' (one update) or 'sequential' (one per request).")
        requests = [
            r if isinstance(r, EditRequest) else EditRequest.from_dict(r, f"request {i}")
            for i, r in enumerate(requests)
        ]
        if not requests:
            raise EditRequestError("no edit requests given.")
        toks = [self.tokenize(r) for r in requests]
        start = on.copy() if on is not None else self.base()
        if start.base is not self.model:
            raise PatchError("`on` must be an EditedModel of this editor's base model.")
        before = self._measure(start, toks, watch_tokens)
        current = start.copy()
        patches = []
        groups = [list(range(len(toks)))] if mode == "batched" else [[i] for i in range(len(toks))]
        for g in groups:
            patch = self.edit_patch(current, [toks[i] for i in g], [requests[i] for i in g])
            patch.meta["mode"] = mode
            current.push(patch)
            patches.append(patch)
        after = self._measure(current, toks, watch_tokens)
        report = []
        for req, t, b, a in zip(requests, toks, before, after):
            row = {
                "prompt": req.prompt,
                "target": req.target,
                "logp_before": b["prompt"][0],
                "logp_after": a["prompt"][0],
                "success_before": b["prompt"][1],
                "success_after": a["prompt"][1],
                "greedy_before": b["greedy"],
                "greedy_after": a["greedy"],
                "rephrases": [],
                "watch": [],
            }
            for k, text in enumerate(req.rephrases):
                row["rephrases"].append(
                    {
                        "text": text,
                        "logp_before": b["rephrases"][k][0],
                        "logp_after": a["rephrases"][k][0],
                        "success_before": b["rephrases"][k][1],
                        "success_after": a["rephrases"][k][1],
                        "greedy_before": b["greedy_rephrases"][k],
                        "greedy_after": a["greedy_rephrases"][k],
                    }
                )
            for k, text in enumerate(req.watch):
                change = self._watch_change(start, current, t.watch[k], b["watch"][k])
                row["watch"].append(
                    {
                        "text": text,
                        "greedy_before": self._decode(b["watch"][k]),
                        "greedy_after": self._decode(a["watch"][k]),
                        "changed": b["watch"][k] != a["watch"][k],
                        **change,
                    }
                )
            report.append(row)
        return EditResult(current, patches, report, mode, self.tokenizer)

    def apply_patches(self, patches: Sequence[Patch], on: Optional[EditedModel] = None) -> EditedModel:
        """The base model (or a copy of ``on``) with saved patches applied in order (each checked first)."""
        model = on.copy() if on is not None else self.base()
        for p in patches:
            if list(p.meta.get("inner_params", p.names)) != self.inner_params:
                LOG.info("patch edits %s; this editor edits %s", p.names, self.inner_params)
            model.push(p)
        return model

    def edit(self, prompts, target_new, ground_truth=None, subject=None, rephrase_prompts=None,
             locality_inputs=None, portability_inputs=None, sequential_edit=False, **options):  # fmt: skip
        """EasyEdit's ``editor.edit(...)``, with its argument names and meanings: returns ``(metrics, edited_model,
        weights_copy)``; see :func:`fact_eval.easyedit_edit`. EasyEdit's options that do not apply here
        (:data:`EASYEDIT_OPTIONS`: the base model is never changed, metrics are always computed) are accepted and
        have no effect; any other keyword is an error."""
        unknown = sorted(set(options) - set(EASYEDIT_OPTIONS))
        if unknown:
            raise TypeError(f"Editor.edit() got unexpected keyword argument(s) {', '.join(unknown)}.")
        return easyedit_edit(
            self, prompts, target_new, ground_truth, subject, rephrase_prompts, locality_inputs,
            portability_inputs, sequential_edit,
        )  # fmt: skip

    # -- sequential evaluation ------------------------------------------------------------------------------
    def eval_sequential(self, **options) -> dict:
        """Apply edits from the gen set one after another: :func:`sequential.eval_sequential` with this editor."""
        return eval_sequential(self, **options)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    description = "Edit a model with a trained editor (MEND, EFK or ENN)."
    p = argparse.ArgumentParser(prog="python -m edit", description=description)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s):
        s.add_argument("--archive", required=True, help="training run directory or checkpoint file")
        s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: cpu)")
        s.add_argument("--model-name", help="load the base model from here instead (e.g. a moved directory)")
        s.add_argument("--cache-dir", help="cache of embedded models and data (default: the run's cache_dir)")
        s.add_argument("-v", "--verbose", action="store_true", help="log progress")

    a = sub.add_parser("apply", help="apply edit requests and/or saved patches; print a before/after table")
    common(a)
    a.add_argument("--requests", help="JSONL file of requests: {prompt, target, rephrases?, watch?} per line")
    a.add_argument("--mode", choices=("batched", "sequential"), default="batched")
    a.add_argument("--patch", action="append", default=[], help="saved patch file or directory, applied first")
    a.add_argument("--out", help="write the edited model here (loads with from_pretrained)")
    a.add_argument("--overwrite", action="store_true", help="allow --out to be a non-empty directory")
    a.add_argument("--patch-out", help="write the new patches here (patch-0000.safetensors, ...)")
    a.add_argument("--report", help="write the per-request figures as JSON here")
    a.add_argument("--watch-tokens", type=int, default=8, help="greedy tokens generated for watched prompts")

    s = sub.add_parser("eval-sequential", help="sequential edits from the gen validation set: retention, drawdown")
    common(s)
    s.add_argument("--n", type=int, default=100, help="number of sequential edits")
    s.add_argument("--checkpoints", default="1,10,100", help="comma-separated edit counts to evaluate at")
    s.add_argument("--n-loc", type=int, default=20, help="locality passages for the perplexity drawdown")
    s.add_argument("--plot", default="sequential-edits.png", help="PNG written here")
    s.add_argument("--report", help="write the figures as JSON here")

    e = sub.add_parser("eval", help="the field's metrics on fact edits: CounterFact's scores, EasyEdit's accuracies")
    common(e)
    e.add_argument("--data", choices=("counterfact",), default="counterfact", help="the cases' format")
    e.add_argument("--path", help="counterfact.json, a JSONL file or hf:<dataset id> (default: the embedded set)")
    e.add_argument("--split", choices=("validation", "train", "all"), default="validation")
    e.add_argument("--n", type=int, default=200, help="evaluate the first N cases")
    e.add_argument("--mode", default="single", help="single, batched, sequential, or several (batched,sequential)")
    e.add_argument("--n-edits", default="1", help="batched / sequential: comma-separated group sizes (1,10,100)")
    e.add_argument("--generation", action="store_true", help="also fluency and consistency (greedy continuations)")
    e.add_argument("--gen-tokens", type=int, default=50, help="tokens generated per generation prompt")
    e.add_argument("--out", help="directory for one JSON per run (cases in pre/post layout) and summary.md")
    e.add_argument("--plot", help="PNG of the scores against the group size")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "apply":
            return _cmd_apply(args)
        if args.command == "eval":
            return _cmd_eval(args)
        return _cmd_eval_sequential(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_apply(args) -> int:
    if not args.requests and not args.patch:
        raise EditRequestError("nothing to apply: give --requests FILE and/or --patch PATH.")
    requests = load_requests(args.requests) if args.requests else []  # a bad file fails before any loading
    if args.out:
        check_output_dir(os.path.expanduser(args.out), args.overwrite)
    patches = load_patches(args.patch) if args.patch else []
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    model = editor.apply_patches(patches) if patches else None
    if patches:
        print(f"applied {len(patches)} saved patch(es) from {', '.join(args.patch)}")
    result = None
    if requests:
        result = editor.apply(requests, mode=args.mode, on=model, watch_tokens=args.watch_tokens)
        model = result.model
        print(result.table())
        if args.patch_out:
            files = result.save_patches(args.patch_out)
            print(f"wrote {len(files)} patch(es) to {args.patch_out}")
        if args.report:
            with open(args.report, "w", encoding="utf-8") as f:
                json.dump({"mode": result.mode, "requests": result.report}, f, indent=1, ensure_ascii=False)
    if args.out:
        info = {"report": result.report} if result is not None else {}
        model.save_pretrained(args.out, editor.tokenizer, args.overwrite, info=info)
        print(f"wrote the edited model ({len(model.patches)} patch(es)) to {args.out}")
    return 0


def _cmd_eval_sequential(args) -> int:
    try:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    except ValueError:
        raise EditRequestError(f"--checkpoints {args.checkpoints!r}: expected comma-separated integers.") from None
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    result = editor.eval_sequential(
        n=args.n, checkpoints=checkpoints, plot=args.plot, n_loc=args.n_loc, cache_dir=args.cache_dir
    )
    head = (
        f"{'edits':>6}  {'still hold':>10}  {'on rephrasing':>13}  {'held when applied':>17}  "
        f"{'ppl pre':>8}  {'ppl post':>8}  {'drawdown':>8}"
    )
    print(head)
    for r in result["checkpoints"]:
        print(
            f"{r['n_edits']:>6}  {r['held']:>4}/{r['n_edits']:<5}  {r['held_rephrase_frac']:>13.2f}  "
            f"{r['success_when_applied_frac']:>17.2f}  {r['perplexity_pre']:>8.3f}  {r['perplexity_post']:>8.3f}  "
            f"{r['drawdown']:>8.3f}"
        )
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    print(f"plot: {result['plot']}")
    return 0


def _cmd_eval(args) -> int:
    try:
        sizes = [int(c) for c in args.n_edits.split(",") if c.strip()]
    except ValueError:
        raise EditRequestError(f"--n-edits {args.n_edits!r}: expected comma-separated integers.") from None
    if not sizes or min(sizes) < 1 or args.n < 1:
        raise EditRequestError("--n and --n-edits must be positive.")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EditRequestError(f"--mode {args.mode!r}: choose from {', '.join(MODES)} (comma-separated for several).")
    plan = [(m, size) for m in modes for size in ([1] if m == "single" else sizes)]
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    data_cfg = editor.config.data.copy()
    data_cfg.path = args.path
    cache_dir = os.path.expanduser(args.cache_dir or editor.config.cache_dir)
    loaded = {split: load_split(data_cfg, split, editor.config.seed, cache_dir)[0] for split in ("train", "validation")}
    splits = ("train", "validation") if args.split == "all" else (args.split,)
    cases = [c for split in splits for c in loaded[split]][: args.n]
    # consistency's idf: the reference texts of the whole data set, so that it does not depend on --n or --split
    corpus = [t for records in loaded.values() for c in records for t in c.get("reference_texts", [])]
    runs = []
    pre = pre_edit_metrics(editor, cases, args.generation, args.gen_tokens, corpus)  # shared by every group size
    for mode, size in plan:
        run = evaluate_facts(
            editor, cases, mode, size, args.generation, args.gen_tokens, pre=pre, reference_corpus=corpus
        )
        runs.append(run)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = f"{mode}" + (f"-{size}" if mode != "single" else "")
            with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(run, f, indent=1, ensure_ascii=False)
    table = fact_summary_table(runs)
    print(f"{len(cases)} cases ({args.data}, {args.path or 'embedded'}, {args.split}); scores in percent")
    print(table)
    if args.out:
        with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.plot and len(runs) > 1:
        plot_fact_curve(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
