"""Use a trained editor: edit requests in, an edited model out.

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

A request file has one JSON object per line:
``{"prompt": "...", "target": "...", "rephrases": ["..."], "watch": ["..."]}`` (rephrases and watch optional).

Semantics:

* ``batched``: all requests in one update (their pseudo-gradients summed, as in training with data.n_edits > 1).
* ``sequential``: one request after another, each edit computed on the model already edited by the previous ones.

Either way each update is kept as a :class:`Patch`: per edited weight the factors u~ (N x d_in), v~ (N x d_out)
and the step size alpha, with W~ = W - alpha * (v~^T u~) for nn.Linear (u~^T v~ for GPT-2's Conv1D). The base
model is never written to: an :class:`EditedModel` is the base model plus a stack of patches, and reverting a
patch recomputes the weights from the untouched base and the remaining patches.

Exit status of the command line: 0 done; 2 a clear error (bad request file, checkpoint or model that do not fit,
output directory not empty), printed as one line.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch.func import functional_call

from errors import (
    EditRequestError,
    OutputExistsError,
    PatchError,
    UserError,
)

LOG = logging.getLogger("edit")

PATCH_FORMAT = "mend-patch/1"
REQUEST_KEYS = ("prompt", "target", "rephrases", "watch")


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------
@dataclass
class EditRequest:
    """Make the model continue ``prompt`` with ``target``.

    ``rephrases``: other phrasings of the prompt on which the edit should hold too (checked, not trained on).
    ``watch``: unrelated prompts whose behaviour should not change (checked).
    """

    prompt: str
    target: str
    rephrases: List[str] = field(default_factory=list)
    watch: List[str] = field(default_factory=list)

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "") -> None:
        at = f"{where}: " if where else ""
        for key in ("prompt", "target"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise EditRequestError(f"{at}'{key}' must be a string, got {type(value).__name__} ({value!r}).")
            if not value.strip():
                raise EditRequestError(f"{at}'{key}' is empty.")
        for key in ("rephrases", "watch"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise EditRequestError(f"{at}'{key}' must be a list of strings, e.g. [{value!r}], not a string.")
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in value):
                raise EditRequestError(f"{at}'{key}' must be a list of non-empty strings, got {value!r}.")
            setattr(self, key, list(value))

    @classmethod
    def from_dict(cls, obj, where: str = "") -> EditRequest:
        at = f"{where}: " if where else ""
        if not isinstance(obj, dict):
            raise EditRequestError(f"{at}expected a JSON object with 'prompt' and 'target', got {type(obj).__name__}.")
        missing = [k for k in ("prompt", "target") if k not in obj]
        if missing:
            raise EditRequestError(f"{at}missing {' and '.join(repr(k) for k in missing)} (keys: {list(obj)}).")
        unknown = [k for k in obj if k not in REQUEST_KEYS]
        if unknown:
            raise EditRequestError(f"{at}unknown key(s) {unknown}; a request has the keys {list(REQUEST_KEYS)}.")
        try:
            return cls(obj["prompt"], obj["target"], obj.get("rephrases", []), obj.get("watch", []))
        except EditRequestError as e:
            raise EditRequestError(f"{at}{e}") from None


def load_requests(path: str) -> List[EditRequest]:
    """Read a JSONL file of requests (blank lines skipped); a malformed line raises naming file and line."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise EditRequestError(f"{path}: no such request file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EditRequestError(f"{path}: cannot be read ({e}).") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EditRequestError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
        requests.append(EditRequest.from_dict(obj, where))
    if not requests:
        raise EditRequestError(f"{path}: holds no requests (one JSON object per line).")
    return requests


@dataclass
class _Tokens:
    prompt: List[int]
    target: List[int]
    rephrases: List[List[int]] = field(default_factory=list)
    watch: List[List[int]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """One applied update: per edited weight the factors (u~, v~) and the step size alpha.

    ``delta(name)`` is alpha * (v~^T u~) in W's own layout ((u~^T v~) for Conv1D); the edited weight is W - delta.
    """

    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    alphas: Dict[str, torch.Tensor]
    fan_in_fan_out: Dict[str, bool]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        return list(self.factors)

    def delta(self, name: str) -> torch.Tensor:
        u, v = self.factors[name]
        pseudo = u.t() @ v if self.fan_in_fan_out[name] else v.t() @ u
        return self.alphas[name] * pseudo

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with this patch applied (computed in float32, then cast to the weight's dtype)."""
        return (weight.float() - self.delta(name)).to(weight.dtype)

    def numel(self) -> int:
        return sum(u.numel() + v.numel() + 1 for u, v in self.factors.values())

    def to(self, device) -> Patch:
        return Patch(
            {n: (u.to(device), v.to(device)) for n, (u, v) in self.factors.items()},
            {n: a.to(device) for n, a in self.alphas.items()},
            dict(self.fan_in_fan_out),
            copy.deepcopy(self.meta),
        )

    def save(self, path: str) -> str:
        """One safetensors file: the factors and step sizes, with the JSON metadata in its header."""
        from safetensors.torch import save_file

        tensors = {}
        for name, (u, v) in self.factors.items():
            tensors[f"{name}::u"] = u.detach().float().cpu().contiguous()
            tensors[f"{name}::v"] = v.detach().float().cpu().contiguous()
            tensors[f"{name}::alpha"] = self.alphas[name].detach().float().cpu().reshape(())
        meta = dict(self.meta, format=PATCH_FORMAT, fan_in_fan_out=self.fan_in_fan_out)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata={"mend_patch": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str, device="cpu") -> Patch:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise PatchError(f"{path}: no such patch file.") from None
        except Exception as e:
            raise PatchError(f"{path}: not a readable patch file ({type(e).__name__}: {e}).") from None
        try:
            meta = json.loads(header["mend_patch"])
            assert meta.get("format") == PATCH_FORMAT
            layout = meta.pop("fan_in_fan_out")
            meta.pop("format")
            factors = {n: (tensors[f"{n}::u"].to(device), tensors[f"{n}::v"].to(device)) for n in layout}
            alphas = {n: tensors[f"{n}::alpha"].to(device) for n in layout}
        except (KeyError, AssertionError, ValueError, TypeError):
            raise PatchError(f"{path}: not a MEND patch written by this program (its metadata is missing).") from None
        return cls(factors, alphas, {n: bool(b) for n, b in layout.items()}, meta)


def load_patches(paths: Union[str, Sequence[str]], device="cpu") -> List[Patch]:
    """Patches from files and/or directories (a directory's *.safetensors files in name order)."""
    if isinstance(paths, str):
        paths = [paths]
    files = []
    for p in paths:
        p = os.path.expanduser(p)
        if os.path.isdir(p):
            found = sorted(f for f in os.listdir(p) if f.endswith(".safetensors"))
            if not found:
                raise PatchError(f"{p}: the directory holds no patch files (*.safetensors).")
            files += [os.path.join(p, f) for f in found]
        else:
            files.append(p)
    return [Patch.load(f, device) for f in files]


def _identity(model: torch.nn.Module, names: Iterable[str]) -> dict:
    from trainer import base_model_identity

    return base_model_identity(model, list(names))


# ---------------------------------------------------------------------------------------------------------
# The edited model: a base model plus a stack of patches
# ---------------------------------------------------------------------------------------------------------
class EditedModel:
    """A frozen base model and the patches applied to it, in order. The base model is never written to.

    ``weights`` holds the edited tensors (base weight with every patch applied in order); calling the object
    runs the base model with them through ``torch.func.functional_call`` and returns logits.
    """

    def __init__(self, base: torch.nn.Module, patches: Sequence[Patch] = (), tokenizer=None):
        self.base = base
        self.tokenizer = tokenizer
        self.patches: List[Patch] = []
        self.weights: Dict[str, torch.Tensor] = {}
        self._identity_cache: Dict[str, dict] = {}
        for p in patches:
            self.push(p)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def copy(self) -> EditedModel:
        other = EditedModel(self.base, tokenizer=self.tokenizer)
        other.patches = list(self.patches)
        other.weights = dict(self.weights)
        other._identity_cache = self._identity_cache
        return other

    def _base_identity(self, names: Iterable[str]) -> dict:
        missing = [n for n in names if n not in self._identity_cache]
        if missing:
            self._identity_cache.update(_identity(self.base, missing)["edited_weights"])
        return {n: self._identity_cache[n] for n in names}

    def check(self, patch: Patch) -> None:
        """Refuse a patch made for another base model (class, shapes or values of the edited weights)."""
        made_for = patch.meta.get("base_model", {})
        where = patch.meta.get("path", "the patch")
        cls = type(self.base).__name__
        if made_for.get("class") and made_for["class"] != cls:
            raise PatchError(
                f"{where} was made for a {made_for['class']} ({patch.meta.get('model', '?')}); this model is a {cls}."
            )
        params = dict(self.base.named_parameters())
        absent = [n for n in patch.names if n not in params]
        if absent:
            raise PatchError(f"{where} edits {absent}, which this {cls} does not have.")
        ours = self._base_identity(patch.names)
        for name, info in made_for.get("edited_weights", {}).items():
            if name not in ours:
                continue
            if info["shape"] != ours[name]["shape"]:
                raise PatchError(
                    f"{where} was made for a model whose {name} has shape {info['shape']}; here it has shape "
                    f"{ours[name]['shape']}."
                )
            if info["sha256"] != ours[name]["sha256"]:
                raise PatchError(
                    f"{where} was made for another base model: its {name} differs from this one's "
                    f"({patch.meta.get('model', '?')}). Apply patches to the base model they were made on."
                )

    def push(self, patch: Patch) -> None:
        """Apply ``patch`` on top of the current weights (checked against the base model first)."""
        self.check(patch)
        patch = patch.to(self.device)
        for name in patch.names:
            current = self.weights.get(name, self.base.get_parameter(name).detach())
            self.weights[name] = patch.apply(name, current)
        self.patches.append(patch)

    def revert(self, index: int = -1) -> Patch:
        """Remove the patch at ``index`` (default: the last one) and return it.

        The weights are recomputed from the untouched base weights and the remaining patches in order, so
        reverting the last patch restores the weights it was applied to bit for bit, and reverting all of
        them gives the base weights themselves.
        """
        if not self.patches:
            raise IndexError("no patch to revert: the model is unedited.")
        removed = self.patches.pop(index)
        weights: Dict[str, torch.Tensor] = {}
        for p in self.patches:
            for name in p.names:
                current = weights.get(name, self.base.get_parameter(name).detach())
                weights[name] = p.apply(name, current)
        self.weights = weights
        return removed

    # -- running it ---------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        from editable_model import logits_of

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.weights:
            out = functional_call(self.base, self.weights, (), kwargs, strict=False)
        else:
            out = self.base(**kwargs)
        return logits_of(out)

    # -- materialising and saving ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The base model's state dict with the edited weights substituted."""
        state = dict(self.base.state_dict())
        state.update({n: w.detach() for n, w in self.weights.items()})
        return state

    def apply_to(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Write the edited weights into ``model`` (a copy of the base) in place; returns the originals.

        ``restore(model, originals)`` puts them back bit for bit.
        """
        originals = {}
        with torch.no_grad():
            for name, w in self.weights.items():
                param = model.get_parameter(name)
                originals[name] = param.detach().clone()
                param.copy_(w.to(param.device, param.dtype))
        return originals

    def materialize(self) -> torch.nn.Module:
        """A plain transformers model (a copy of the base) holding the edited weights."""
        model = copy.deepcopy(self.base)
        self.apply_to(model)
        return model

    def save_pretrained(self, out_dir: str, tokenizer=None, overwrite: bool = False, info: Optional[dict] = None):
        """Write the edited model so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

        Refuses a non-empty directory unless ``overwrite``. After writing, the edited weights are read back
        from the saved files and compared with the ones in memory.
        """
        out_dir = os.path.expanduser(out_dir)
        check_output_dir(out_dir, overwrite)
        model = self.materialize()
        if getattr(model.config, "quantization_config", None) is not None:  # e.g. a GGUF-loaded model
            del model.config.quantization_config
            model.hf_quantizer = None
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        record = {"patches": [p.meta for p in self.patches], "edited_weights": sorted(self.weights)}
        record.update(info or {})
        with open(os.path.join(out_dir, "edits.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, ensure_ascii=False)
        self._verify_saved(out_dir)
        return out_dir

    def _verify_saved(self, out_dir: str) -> None:
        from safetensors import safe_open

        found = {}
        for fname in sorted(os.listdir(out_dir)):
            if fname.endswith(".safetensors"):
                with safe_open(os.path.join(out_dir, fname), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        if key in self.weights:
                            found[key] = f.get_tensor(key)
        for name, w in self.weights.items():
            if name not in found:
                LOG.warning("%s: could not find %s in the saved files to check it.", out_dir, name)
            elif not torch.equal(found[name], w.detach().to("cpu", found[name].dtype)):
                raise RuntimeError(f"{out_dir}: the saved {name} is not the edited weight; the save is wrong.")


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise OutputExistsError(f"{out_dir} exists and is not a directory.")
        if os.listdir(out_dir) and not overwrite:
            raise OutputExistsError(f"{out_dir} is not empty; choose another directory or pass --overwrite.")


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
def config_from_meta(meta: dict, path: str):
    """The full run configuration stored in a checkpoint's metadata, as an OmegaConf object."""
    from omegaconf import OmegaConf

    from config_schema import merge_saved_config
    from trainer import CheckpointError

    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its metadata holds no run configuration; it cannot be used to edit.")
    try:
        return merge_saved_config(saved)  # keys added since take their defaults, keys removed since are dropped
    except Exception:  # written by another version of the schema: take it as it is
        return OmegaConf.create(saved)


def check_base_model(model: torch.nn.Module, meta: dict, inner_params: List[str], path: str) -> None:
    """Refuse a base model the editor was not trained for (other class, missing or reshaped edited weights)."""
    from models import InnerParamsError, check_inner_params
    from trainer import CheckpointError

    trained_for = meta.get("base_model") or {}
    name = meta.get("model", "?")
    cls = type(model).__name__
    if trained_for.get("class") and trained_for["class"] != cls:
        raise CheckpointError(
            f"{path}: this editor was trained for a {trained_for['class']} ({name}); the base model given is a "
            f"{cls}. An editor only edits the model (architecture and weights) it was trained on."
        )
    try:
        check_inner_params(model, inner_params)
    except InnerParamsError as e:
        raise CheckpointError(
            f"{path}: this editor edits {inner_params}, which do not fit the base model given ({cls}): {e}"
        ) from None
    ours = _identity(model, inner_params)["edited_weights"]
    for w, info in trained_for.get("edited_weights", {}).items():
        if w in ours and ours[w]["shape"] != info["shape"]:
            raise CheckpointError(
                f"{path}: this editor was trained on a model whose {w} has shape {info['shape']}; the base model "
                f"given has shape {ours[w]['shape']}."
            )
        if w in ours and ours[w]["sha256"] != info["sha256"]:
            LOG.warning(
                "%s: the base model's %s differs from the one the editor was trained on (another version or "
                "fine-tune?); edits may not work as validated.",
                path,
                w,
            )


class Editor:
    """A trained editor (MEND) with its base model and tokenizer, ready to apply edit requests."""

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
        for: another class, other edited weights or other shapes raise :class:`trainer.CheckpointError`.
        """
        from algs.mend import MEND
        from models import get_model, get_tokenizer
        from trainer import CheckpointError, checkpoint_path, read_checkpoint
        from utils import resolve_device

        path = checkpoint_path(archive)
        ckpt = read_checkpoint(path)
        meta = ckpt["meta"]
        config = config_from_meta(meta, path)
        if config.alg != "mend":
            raise CheckpointError(f"{path}: holds a {config.alg!r} editor; editing from checkpoints needs MEND.")
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
        if model is None:
            model = get_model(config.model, cache_dir)
        model.eval()
        model.requires_grad_(False)
        inner = list(config.model.inner_params)
        check_base_model(model, meta, inner, path)
        if tokenizer is None:
            tokenizer = get_tokenizer(config.model, cache_dir)
        model.to(resolve_device(device))
        try:
            alg = MEND(model, config)
            alg.load_state_dict(ckpt["editor"])
        except (RuntimeError, TypeError, KeyError) as e:
            raise CheckpointError(
                f"{path}: the editor it holds does not fit its own configuration and this model: "
                f"{str(e).splitlines()[0]}"
            ) from None
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

    def tokenize(self, request: EditRequest) -> _Tokens:
        """Prompt and target tokenised separately (a space joins them unless one side already has it)."""
        target = request.target
        if not (target[:1].isspace() or request.prompt[-1:].isspace()):
            target = " " + target
        toks = _Tokens(
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
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for r, (p, t) in enumerate(rows):
            seq = torch.tensor(p + t, dtype=torch.long)
            ids[r, : len(seq)] = seq
            mask[r, : len(seq)] = 1
            labels[r, len(p) : len(seq)] = seq[len(p) :]
        dev = self.device
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}

    # -- measuring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, model: EditedModel, rows: Sequence[Tuple[List[int], List[int]]], chunk: int = 16):
        """Per row: (log p(target | prompt) summed over target tokens, whether every target token is the argmax)."""
        out = []
        for s in range(0, len(rows), chunk):
            batch = self._batch(rows[s : s + chunk])
            logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            correct = (logits.argmax(-1) == labels) | ~mask
            for r in range(len(labels)):
                out.append(((lp[r] * mask[r]).sum().item(), bool(correct[r].all().item())))
        return out

    @torch.no_grad()
    def greedy(self, model: EditedModel, prompt: List[int], n: int) -> List[int]:
        ids = list(prompt)
        eos = self.tokenizer.eos_token_id
        for _ in range(n):
            x = torch.tensor([ids], device=self.device)
            nxt = int(model(x, torch.ones_like(x))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
        return ids[len(prompt) :]

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _measure(self, model: EditedModel, toks: List[_Tokens], watch_tokens: int) -> List[dict]:
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
        from losses import kl_loc_loss

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

    def _edit(self, current: EditedModel, toks: List[_Tokens], requests: Sequence[EditRequest] = ()) -> Patch:
        from algs.mend import MEND

        alg = MEND(self.model, self.config, weights=current.weights, mend=self.alg.mend, edit_lrs=self.alg.edit_lrs)
        alg.eval()
        batch = self._batch([(t.prompt, t.target) for t in toks])
        with torch.no_grad():
            edited, _ = alg.edit(batch)
        steps = self.alg.descent_step_sizes().detach()
        alphas = {n: steps[i].clone() for i, n in enumerate(self.inner_params)}
        layout = {n: alg.layout[n][0] for n in self.inner_params}
        meta = {
            "model": self.config.model.name,
            "editor": self.path,
            "inner_params": self.inner_params,
            "base_model": {
                "class": type(self.model).__name__,
                "edited_weights": current._base_identity(self.inner_params),
            },
            "requests": [{"prompt": r.prompt, "target": r.target} for r in requests],
            "n_positions": {n: int(u.shape[0]) for n, (u, _) in edited.last_factors.items()},
        }
        return Patch(dict(edited.last_factors), alphas, layout, meta)

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
            patch = self._edit(current, [toks[i] for i in g], [requests[i] for i in g])
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

    # -- sequential evaluation ------------------------------------------------------------------------------
    def eval_sequential(
        self,
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
        import numpy as np

        from data_classes.gen import GenDataset

        cache_dir = os.path.expanduser(cache_dir or self.config.cache_dir)
        ds = GenDataset(
            self.tokenizer,
            self.config.data,
            split,
            seed=self.config.seed,
            cache_dir=cache_dir,
            model=self.model,
            model_id=self.config.model.name,
            device=self.device,
        )
        order = np.random.default_rng(int(self.config.seed)).permutation(len(ds)).tolist()
        picks = [order[k % len(order)] for k in range(n)]
        toks = [_Tokens(ds.passage_ids[i], ds.target_ids[i], [ds.rephrase(i)[1]]) for i in picks]
        loc_ids = []
        for i in picks:
            ids = ds._loc(i, 0)[1]
            if ids not in loc_ids:
                loc_ids.append(ids)
            if len(loc_ids) >= n_loc:
                break
        checkpoints = sorted({int(c) for c in checkpoints if 1 <= int(c) <= n})

        def perplexity(model):
            total = count = 0.0
            for ids in loc_ids:
                lp, _ = self.score(model, [(ids[:1], ids[1:])])[0]
                total, count = total - lp, count + len(ids) - 1
            return math.exp(total / max(count, 1))

        current = self.base()
        ppl_pre = perplexity(current)
        immediate, rows = [], []
        for k, t in enumerate(toks, 1):
            current.push(self._edit(current, [t]))
            immediate.append(self.score(current, [(t.prompt, t.target)])[0][1])
            if k in checkpoints:
                held = [s for _, s in self.score(current, [(x.prompt, x.target) for x in toks[:k]])]
                held_r = [s for _, s in self.score(current, [(x.rephrases[0], x.target) for x in toks[:k]])]
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
        result = {"archive": self.path, "n": n, "n_loc": len(loc_ids), "checkpoints": rows}
        if plot:
            result["plot"] = plot_sequential(rows, plot, title=f"sequential edits: {self.config.model.name}")
        return result


def plot_sequential(rows: List[dict], path: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["n_edits"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edit", description="Edit a model with a trained MEND editor.")
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "apply":
            return _cmd_apply(args)
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
    result = editor.eval_sequential(args.n, checkpoints, plot=args.plot, n_loc=args.n_loc, cache_dir=args.cache_dir)
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


if __name__ == "__main__":
    sys.exit(main())
