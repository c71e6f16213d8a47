"""The :class:`Editor`: a trained editor (any editor of ``algs``) with its base model and tokenizer, and its public
surface, which the command line (``edit.py``), the field's metrics (``fact_eval.py``) and the sequential experiment
(``sequential.py``) use and nothing else of it:

* loading: :meth:`Editor.from_archive` (a training run), :meth:`Editor.from_pretrained` (a saved editor, from a
  directory or the hub; :meth:`Editor.save_pretrained` writes one, ``editor_io.py``); the base model
  (:attr:`Editor.model`, and :meth:`Editor.base`, the base model as an :class:`patches.EditedModel` with no patch),
  its tokenizer, configuration and device;
* text and tokens: :meth:`Editor.encode`, :meth:`Editor.decode`, :meth:`Editor.tokenize` (a request),
  :meth:`Editor.batch` (prompt + target rows as a batch laid out as in training);
* measuring: :meth:`Editor.score` (log p(target | prompt) per row, from :func:`losses.sequence_log_probs`),
  :meth:`Editor.greedy` and :meth:`Editor.greedy_many` (greedy continuations);
* editing: :meth:`Editor.edit_patch` (the patch of one update, :meth:`patches.Patch.from_edit`),
  :meth:`Editor.apply` (requests in, an :class:`EditResult` out), :meth:`Editor.apply_patches` (saved patches),
  :meth:`Editor.edit` and :meth:`Editor.batch_edit` (EasyEdit's calls, with :attr:`Editor.tok` and
  :attr:`Editor.hparams`) and :meth:`Editor.eval_sequential` (the sequential experiment);
* sharing an edit: :meth:`Editor.save_peft_adapter` (the patches as a PEFT LoRA adapter, ``peft_export.py``).

Users import these names from ``edit`` (``from edit import Editor``), which re-exports them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import easyedit_api
from algs import ALGS, editor_class
from checkpoints import (
    base_model_identity,
    check_base_model,
    checkpoint_meta,
    checkpoint_path,
    config_from_meta,
    load_editor_state,
    read_checkpoint,
)
from data_classes.batches import prompt_target_batch
from data_classes.gen import context_length
from data_classes.requests import EditRequest, EditTokens
from editor_io import is_saved_editor, looks_like_hub_id, read_editor, run_results, write_editor
from errors import CheckpointError, EditRequestError, PatchError
from key_stats import SecondMoments
from losses import SequenceScore, kl_loc_loss, sequence_log_probs
from models import get_model, get_tokenizer
from patches import EditedModel, Patch
from peft_export import save_lora_adapter
from preflight import MAX_PROMPT_TOKENS, check_device, check_prompt_lengths
from progress import ProgressBars
from sequential import eval_sequential
from utils import resolve_device

LOG = logging.getLogger("edit")
Row = Tuple[List[int], List[int]]  # (prompt ids, target ids)


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
        """A plain transformers model (a copy of the base) holding the edited weights."""
        return self.model.materialize()

    def save_pretrained(self, out_dir: str, overwrite: bool = False) -> str:
        """Write the edited model, its tokenizer and the report (``edits.json``) for ``from_pretrained``."""
        return self.model.save_pretrained(out_dir, self.tokenizer, overwrite, info={"report": self.report})

    def save_patches(self, out_dir: str) -> List[str]:
        """Write each new patch as ``patch-NNNN.safetensors``, numbered after the highest one already in ``out_dir``
        (so that none is replaced, and file-name order stays the order they were applied in)."""
        os.makedirs(out_dir, exist_ok=True)
        numbers = [f[6:-12] for f in os.listdir(out_dir) if f.startswith("patch-") and f.endswith(".safetensors")]
        start = max((int(n) for n in numbers if n.isdigit()), default=-1) + 1
        return [p.save(os.path.join(out_dir, f"patch-{start + i:04d}.safetensors")) for i, p in enumerate(self.patches)]

    def table(self) -> str:
        """The before/after table of :func:`format_table`."""
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
    warnings = [f"warning: request {i}: {w}" for i, r in enumerate(report, 1) for w in r.get("warnings", [])]
    return "\n".join(lines + ["", summary] + warnings)


# ---------------------------------------------------------------------------------------------------------
# The editor
# ---------------------------------------------------------------------------------------------------------
class Editor:
    """A trained editor (any of ``algs``) with its base model and tokenizer, ready to apply edit requests.

    Attributes: ``alg`` the editor (an ``editable_model.EditableModel``), ``model`` the frozen base model it edits,
    ``tokenizer``, ``config`` the training run's configuration, ``meta`` the checkpoint's metadata, ``path`` the
    checkpoint file, ``inner_params`` the names of the edited weights, ``pad_id`` the padding token.
    """

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
        self._fresh_state = alg.lifelong_state()  # as loaded: what start_sequence() returns the editor to
        # Editors that build prompts from text and weigh keys by corpus statistics (ROME, MEMIT, AlphaEdit).
        alg.attach_text(tokenizer, SecondMoments(self.model, tokenizer, config.cache_dir, config.model.name))

    @property
    def device(self) -> torch.device:
        """Where the base model is."""
        return next(self.model.parameters()).device

    @property
    def tok(self):
        """The tokenizer, under EasyEdit's name."""
        return self.tokenizer

    @property
    def hparams(self):
        """The training run's configuration, under EasyEdit's name (``hparams.data.n_edits``: the edits per update
        of :meth:`batch_edit`)."""
        return self.config

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
        """Load a training run's editor (a run directory or a checkpoint file) and its base model; a saved editor
        (a directory or hub id of :meth:`save_pretrained`) is loaded by :meth:`from_pretrained`.

        ``model_name`` loads the base model from another place (e.g. a directory it was moved to);
        ``model`` / ``tokenizer`` use objects already loaded. Either must be the model the editor was trained
        for: another class, other edited weights or other shapes raise :class:`errors.CheckpointError`.
        """
        check_device(device, "device")  # before the checkpoint and the model load
        if is_saved_editor(archive) or looks_like_hub_id(archive):
            return cls.from_pretrained(archive, device, cache_dir, model_name, model, tokenizer, inner_params)
        path = checkpoint_path(archive)
        ckpt = read_checkpoint(path)
        meta, state = ckpt["meta"], ckpt["editor"]
        return cls._build(meta, state, path, device, cache_dir, model_name, model, tokenizer, inner_params)

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        device: str = "cpu",
        cache_dir: Optional[str] = None,
        model_name: Optional[str] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer=None,
        inner_params: Optional[Sequence[str]] = None,
        revision: Optional[str] = None,
    ) -> Editor:
        """Load an editor written by :meth:`save_pretrained` (a directory, or a hub id fetched with
        ``huggingface_hub``; offline, one not in the local cache raises :class:`errors.HubError`) and its base
        model; the other arguments as in :meth:`from_archive`."""
        check_device(device, "device")
        s = read_editor(source, revision)
        return cls._build(s.meta, s.state, s.path, device, cache_dir, model_name, model, tokenizer, inner_params)

    @classmethod
    def _build(cls, meta, state, path, device, cache_dir, model_name, model, tokenizer, inner_params) -> Editor:
        """The editor of ``meta`` (a checkpoint's metadata) and ``state`` (its state dict) on its base model."""
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
        check_base_model(model, meta, list(config.model.inner_params), path)
        if tokenizer is None:
            tokenizer = get_tokenizer(config.model, cache_dir)
        model.to(resolve_device(device))
        alg = editor_class(config.alg)(model, config)
        load_editor_state(alg, state, path)
        trained = alg.trained_base()
        if trained:  # trained with train_base: edits apply to the base model as the editor trained it
            if given:  # the caller's model stays as it is
                model = copy.deepcopy(model)
                alg = editor_class(config.alg)(model, config)
                load_editor_state(alg, state, path)
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

    # -- sharing ----------------------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str, overwrite: bool = False) -> str:
        """Write this editor as a small directory that :meth:`from_pretrained` loads (``editor_io.py``): its settings
        and the base model's name and identity (``editor_config.json``), its parameters and statistics
        (``editor.safetensors``; the statistics it starts each independent sequence from, as loaded, not what edits
        since added to them) and a model card (``README.md``, with the training run's evaluation when the editor
        came from a run directory). Not the base model's weights. A non-empty ``out_dir`` needs ``overwrite``."""
        identity = self.meta.get("base_model") or base_model_identity(self.model, self.inner_params)
        meta = json.loads(checkpoint_meta(self.config, identity))
        lifelong = self.alg.lifelong_state()
        self.start_sequence()  # the state as loaded
        try:
            state = {k: v.detach().clone() for k, v in self.alg.state_dict().items()}
        finally:
            if lifelong:
                self.alg.load_lifelong_state(lifelong)
        evaluation = self.meta.get("evaluation") or (run_results(self.path) if os.path.isfile(self.path) else None)
        return write_editor(out_dir, meta, state, evaluation, overwrite)

    def save_peft_adapter(self, model: EditedModel, out_dir: str, overwrite: bool = False) -> str:
        """Write the patches of ``model`` (e.g. ``EditResult.model``) as a PEFT LoRA adapter of the base model
        (``peft_export.py``): ``PeftModel.from_pretrained(base, out_dir)`` runs the edited model, and its
        ``merge_and_unload()`` is the model ``save_pretrained`` writes."""
        if self.alg.trained_base():
            raise PatchError(
                f"{self.path}: this editor trained its base model (train_base), so its edits apply to weights that "
                f"differ from {self.config.model.name}'s beyond the edited ones; an adapter of that model cannot "
                f"hold them. Write the whole edited model instead (--out / EditResult.save_pretrained)."
            )
        return save_lora_adapter(model, out_dir, self.config.model.name, overwrite)

    # -- text, tokens and batches ---------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        """The token ids of ``text``, without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids, special tokens and spacing kept as they are."""
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def tokenize(self, request: EditRequest) -> EditTokens:
        """Prompt and target tokenised separately (a space joins them unless one side already has it)."""
        target = request.target
        if not (target[:1].isspace() or request.prompt[-1:].isspace()):
            target = " " + target
        toks = EditTokens(
            self.encode(request.prompt),
            self.encode(target),
            [self.encode(r) for r in request.rephrases],
            [self.encode(w) for w in request.watch],
        )
        if not toks.target:
            raise EditRequestError(f"the target {request.target!r} tokenises to nothing.")
        return toks

    def batch(self, rows: Sequence[Row]) -> Dict[str, torch.Tensor]:
        """(prompt ids, target ids) rows as a batch on the model's device, laid out as training batches are:
        right-padded ``input_ids`` and ``attention_mask``, ``labels`` on the target tokens only."""
        return {k: v.to(self.device) for k, v in prompt_target_batch(rows, self.pad_id).items()}

    # -- measuring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model: EditedModel, rows: Sequence[Row], chunk: int = 16) -> List[SequenceScore]:
        """Per (prompt ids, target ids) row, how ``model`` predicts the target after the prompt, teacher-forced
        (:class:`losses.SequenceScore`: log p(target | prompt), the mean NLL per token, whether every target token
        is the argmax, the fraction that are, the argmax tokens); ``chunk`` rows per forward pass."""
        out: List[SequenceScore] = []
        for s in range(0, len(rows), chunk):
            batch = self.batch(rows[s : s + chunk])
            out += sequence_log_probs(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
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

    def _measure(self, model: EditedModel, toks: List[EditTokens], watch_tokens: int, tick=None) -> List[dict]:
        rows = [(t.prompt, t.target) for t in toks] + [(r, t.target) for t in toks for r in t.rephrases]
        scores = iter(self.score(model, rows))
        out = [{"prompt": next(scores)} for _ in toks]
        for k, (o, t) in enumerate(zip(out, toks)):
            if tick is not None:
                tick(k)
            o["rephrases"] = [next(scores) for _ in t.rephrases]
            o["greedy"] = self.decode(self.greedy(model, t.prompt, len(t.target)))
            o["greedy_rephrases"] = [self.decode(self.greedy(model, r, len(t.target))) for r in t.rephrases]
            o["watch"] = [self.greedy(model, w, watch_tokens) for w in t.watch]
        if tick is not None:
            tick(len(toks))
        return out

    @torch.no_grad()
    def _watch_change(self, before: EditedModel, after: EditedModel, prompt: List[int], cont: List[int]) -> dict:
        """A watched prompt and its continuation on ``before``: KL(before || after) over their positions and the
        continuation's log-probability on each model."""
        batch = self.batch([(prompt, cont)])
        pre = before(batch["input_ids"], batch["attention_mask"])
        post = after(batch["input_ids"], batch["attention_mask"])
        lp = [sequence_log_probs(logits, batch["labels"])[0].log_prob for logits in (pre, post)]
        return {"kl": kl_loc_loss(pre, post).item(), "logp_before": lp[0], "logp_after": lp[1]}

    # -- editing ----------------------------------------------------------------------------------------------
    def base(self) -> EditedModel:
        """The unedited base model, as an :class:`EditedModel` with no patch."""
        return EditedModel(self.model, tokenizer=self.tokenizer)

    def start_sequence(self) -> None:
        """Forget what earlier edits left in the editor besides the weights (UltraEdit's running statistics): the
        next edit starts a new sequence, as on the editor just loaded. Edits on the unedited model (``apply``
        without ``on``, each group of ``python -m edit eval``, each request of a non-sequential ``edit``) call it;
        an editor without such state is unaffected."""
        if self._fresh_state:
            self.alg.load_lifelong_state(self._fresh_state)

    def edit_patch(self, current: EditedModel, toks: List[EditTokens], requests: Sequence[EditRequest] = ()) -> Patch:
        """The patch of one update for ``toks`` (all of them together), computed on the model ``current``."""
        alg = self.alg.with_weights(current.weights)
        alg.eval()
        with torch.no_grad():
            batch = self.batch([(t.prompt, t.target) for t in toks])
            if len(requests) == len(toks):  # the text too, for editors that build their own prompts
                batch["requests"] = [{"prompt": r.prompt, "subject": r.subject, "target": r.target} for r in requests]
            edited, _ = alg.edit(batch)
        meta = {
            "model": self.config.model.name,
            "editor": self.path,
            "inner_params": self.inner_params,
            "base_model": {
                "class": type(self.model).__name__,
                "edited_weights": current.base_identity(self.inner_params),
            },
            "requests": [{"prompt": r.prompt, "target": r.target} for r in requests],
        }
        return Patch.from_edit(alg, edited, self.inner_params, meta)

    def apply(
        self,
        requests: Sequence[Union[EditRequest, dict]],
        mode: str = "batched",
        on: Optional[EditedModel] = None,
        watch_tokens: int = 8,
        progress: Optional[Callable[[str, int, int], None]] = None,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    ) -> EditResult:
        """Apply edit requests; returns the edited model, the patches and per-request figures.

        ``mode="batched"``: all requests in one update. ``mode="sequential"``: one update per request, in order,
        each computed on the model already edited by the previous ones. ``on``: an :class:`EditedModel` to edit
        further (it is left unchanged; the result holds its patches followed by the new ones).
        "before" figures are measured on ``on`` (default: the base model), "after" ones on the result.
        ``progress(stage, done, total)``: told how the measuring and the edits advance (default: bars on a
        terminal). A prompt longer than the model's context is refused before any work; one above
        ``max_prompt_tokens``, and an edit that makes its own target less likely, get a warning in the report.
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
        length_warnings = [self._length_warnings(i, t, watch_tokens, max_prompt_tokens) for i, t in enumerate(toks)]
        bars = ProgressBars() if progress is None else None
        tell = progress or bars

        def ticker(stage):
            return lambda k: tell(stage, k, len(toks))

        if on is None:
            self.start_sequence()
        start = on.copy() if on is not None else self.base()
        if start.base is not self.model:
            raise PatchError("`on` must be an EditedModel of this editor's base model.")
        before = self._measure(start, toks, watch_tokens, ticker("measuring before the edit"))
        current = start.copy()
        patches = []
        groups = [list(range(len(toks)))] if mode == "batched" else [[i] for i in range(len(toks))]
        for n, g in enumerate(groups):
            tell("edits", n, len(groups))
            patch = self.edit_patch(current, [toks[i] for i in g], [requests[i] for i in g])
            patch.meta["mode"] = mode
            current.push(patch)
            patches.append(patch)
        tell("edits", len(groups), len(groups))
        after = self._measure(current, toks, watch_tokens, ticker("measuring after the edit"))
        if bars is not None:
            bars.close()
        report = [self._report_row(r, t, b, a, start, current) for r, t, b, a in zip(requests, toks, before, after)]
        for row, warnings in zip(report, length_warnings):
            if row["logp_after"] < row["logp_before"]:
                warnings.append(
                    f"the edit made its own target less likely (log p {row['logp_before']:.2f} -> "
                    f"{row['logp_after']:.2f})"
                )
            row["warnings"] = warnings
        return EditResult(current, patches, report, mode, self.tokenizer)

    def _length_warnings(self, i: int, t: EditTokens, watch_tokens: int, limit: int) -> List[str]:
        """Request ``i``'s texts with their targets, as the model reads them, checked against the context and
        ``limit`` (:func:`preflight.check_prompt_lengths`)."""
        texts = [("the prompt", len(t.prompt) + len(t.target))]
        texts += [(f"rephrasing {k + 1}", len(r) + len(t.target)) for k, r in enumerate(t.rephrases)]
        texts += [(f"watched prompt {k + 1}", len(w) + watch_tokens) for k, w in enumerate(t.watch)]
        return check_prompt_lengths(texts, context_length(self.model), limit, where=f"request {i + 1}")

    def _report_row(self, req: EditRequest, t: EditTokens, b: dict, a: dict, start, current) -> dict:
        """One request's figures before (``b``, on ``start``) and after (``a``, on ``current``)."""
        row = {
            "prompt": req.prompt,
            "target": req.target,
            "logp_before": b["prompt"].log_prob,
            "logp_after": a["prompt"].log_prob,
            "success_before": b["prompt"].correct,
            "success_after": a["prompt"].correct,
            "greedy_before": b["greedy"],
            "greedy_after": a["greedy"],
            "rephrases": [],
            "watch": [],
        }
        for k, text in enumerate(req.rephrases):
            row["rephrases"].append(
                {
                    "text": text,
                    "logp_before": b["rephrases"][k].log_prob,
                    "logp_after": a["rephrases"][k].log_prob,
                    "success_before": b["rephrases"][k].correct,
                    "success_after": a["rephrases"][k].correct,
                    "greedy_before": b["greedy_rephrases"][k],
                    "greedy_after": a["greedy_rephrases"][k],
                }
            )
        for k, text in enumerate(req.watch):
            change = self._watch_change(start, current, t.watch[k], b["watch"][k])
            row["watch"].append(
                {
                    "text": text,
                    "greedy_before": self.decode(b["watch"][k]),
                    "greedy_after": self.decode(a["watch"][k]),
                    "changed": b["watch"][k] != a["watch"][k],
                    **change,
                }
            )
        return row

    def apply_patches(self, patches: Sequence[Patch], on: Optional[EditedModel] = None) -> EditedModel:
        """The base model (or a copy of ``on``) with saved patches applied in order (each checked first)."""
        model = on.copy() if on is not None else self.base()
        for p in patches:
            if list(p.meta.get("inner_params", p.names)) != self.inner_params:
                LOG.info("patch edits %s; this editor edits %s", p.names, self.inner_params)
            model.push(p)
        return model

    def edit(
        self,
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
        """EasyEdit's ``editor.edit(...)``, its arguments in its order (``subject=``, ``test_generation=``,
        ``keep_original_weight=`` ... as keywords): returns ``(metrics, edited_model, weights_copy)`` and prints
        EasyEdit's summary; see :func:`easyedit_api.edit`."""
        return easyedit_api.edit(
            self,
            prompts,
            target_new,
            ground_truth,
            target_neg,
            rephrase_prompts,
            locality_inputs,
            portability_inputs,
            sequential_edit,
            verbose,
            **kwargs,
        )

    def batch_edit(
        self,
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
        """EasyEdit's ``editor.batch_edit(...)``: ``hparams.data.n_edits`` requests per update; returns ``(metrics,
        edited_model, weights_copy)``; see :func:`easyedit_api.batch_edit`."""
        return easyedit_api.batch_edit(
            self,
            prompts,
            target_new,
            ground_truth,
            target_neg,
            rephrase_prompts,
            locality_inputs,
            portability_inputs,
            sequential_edit,
            verbose,
            **kwargs,
        )

    def eval_sequential(self, **options) -> dict:
        """Apply edits from the validation data of the editor's task one after another:
        :func:`sequential.eval_sequential` with this editor (with progress bars on a terminal unless ``progress`` is
        given)."""
        if "progress" in options:
            return eval_sequential(self, **options)
        bars = ProgressBars()
        try:
            return eval_sequential(self, progress=bars, **options)
        finally:
            bars.close()
