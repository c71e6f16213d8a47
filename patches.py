"""Patches and the edited-model stack: what an edit leaves behind, kept apart from the base model.

A :class:`Patch` is one applied update: per edited weight either low-rank factors u~ (N x d_in), v~ (N x d_out) and
a step size alpha, with ``W~ = W - alpha * (v~^T u~)`` for nn.Linear (``u~^T v~`` for GPT-2's Conv1D), for an editor
whose update is low-rank, or the dense difference ``W - W~`` for one whose update has no low-rank form
(``EditableModel.low_rank_update``). It is saved as one safetensors file with its metadata (the model, the requests,
the identity of the base model it was made on) in the header.

An :class:`EditedModel` is a frozen base model and a stack of patches. The base model is never written to: the
edited weights are computed from the untouched base weights and the patches in order, and run through
``torch.func.functional_call``; reverting a patch recomputes them from the base and the remaining patches.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import identity_diff, weight_identity
from editable_model import (
    EditableModel,
    cache_argument,
    call_with_weights,
    forward_takes,
    logits_of,
    output_with_weights,
    state_dict_with,
)
from errors import OutputExistsError, PatchError
from utils import pad_rows

LOG = logging.getLogger("edit")

PATCH_FORMAT = "mend-patch/1"  # the project's patch format (kept, so that saved patches stay readable)


# ---------------------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Patch:
    """One applied update: per edited weight the factors (u~, v~) and the step size alpha, or a dense difference.

    ``delta(name)`` is alpha * (v~^T u~) in W's own layout ((u~^T v~) for Conv1D), or ``dense[name]``; the edited
    weight is W - delta.
    """

    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    alphas: Dict[str, torch.Tensor]
    fan_in_fan_out: Dict[str, bool]
    meta: dict = field(default_factory=dict)
    dense: Dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> W - W~, for updates of no low-rank form

    @classmethod
    def from_edit(cls, before: EditableModel, after: EditableModel, names: Sequence[str], meta: dict) -> Patch:
        """The patch that takes ``before``'s weights to ``after``'s (what ``before.edit(batch)`` returned): per weight
        in ``names`` the editor's low-rank update (``EditableModel.low_rank_update``), or, for an update of no
        low-rank form, the dense difference W - W~. ``meta`` (the requests, the base model's identity, ...) is kept
        with it, with the number of edited positions per low-rank weight added as ``n_positions``."""
        factors, alphas, layout, dense, positions = {}, {}, {}, {}, {}
        for name in names:
            update = after.low_rank_update(name)
            if update is None:
                dense[name] = before.current_weight(name).detach().float() - after.current_weight(name).detach().float()
                continue
            u, v, alphas[name], layout[name] = update
            factors[name] = (u, v)
            positions[name] = int(u.shape[0])
        return cls(factors, alphas, layout, dict(meta, n_positions=positions), dense)

    @property
    def names(self) -> List[str]:
        return list(self.factors) + list(self.dense)

    def delta(self, name: str) -> torch.Tensor:
        if name in self.dense:
            return self.dense[name]
        u, v = self.factors[name]
        pseudo = u.t() @ v if self.fan_in_fan_out[name] else v.t() @ u
        return self.alphas[name] * pseudo

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with this patch applied (computed in float32, then cast to the weight's dtype)."""
        return (weight.float() - self.delta(name)).to(weight.dtype)

    def numel(self) -> int:
        low_rank = sum(u.numel() + v.numel() + 1 for u, v in self.factors.values())
        return low_rank + sum(d.numel() for d in self.dense.values())

    def to(self, device) -> Patch:
        return Patch(
            {n: (u.to(device), v.to(device)) for n, (u, v) in self.factors.items()},
            {n: a.to(device) for n, a in self.alphas.items()},
            dict(self.fan_in_fan_out),
            copy.deepcopy(self.meta),
            {n: d.to(device) for n, d in self.dense.items()},
        )

    def save(self, path: str) -> str:
        """One safetensors file: the factors and step sizes, with the JSON metadata in its header."""
        tensors = {}
        for name, (u, v) in self.factors.items():
            tensors[f"{name}::u"] = u.detach().float().cpu().contiguous()
            tensors[f"{name}::v"] = v.detach().float().cpu().contiguous()
            tensors[f"{name}::alpha"] = self.alphas[name].detach().float().cpu().reshape(())
        for name, d in self.dense.items():
            tensors[f"{name}::delta"] = d.detach().float().cpu().contiguous()
        meta = dict(self.meta, format=PATCH_FORMAT, fan_in_fan_out=self.fan_in_fan_out)
        if self.dense:
            meta["dense"] = list(self.dense)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata={"mend_patch": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str, device="cpu") -> Patch:
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
            dense = {n: tensors[f"{n}::delta"].to(device) for n in meta.pop("dense", [])}
        except (KeyError, AssertionError, ValueError, TypeError):
            raise PatchError(f"{path}: not a patch written by this program (its metadata is missing).") from None
        return cls(factors, alphas, {n: bool(b) for n, b in layout.items()}, meta, dense)


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

    def base_identity(self, names: Iterable[str]) -> dict:
        """The identity (shape and hash) of the base model's weights ``names``, as a patch records it to be checked
        against the model it is applied to (computed once per weight)."""
        missing = [n for n in names if n not in self._identity_cache]
        if missing:
            self._identity_cache.update(weight_identity(self.base, missing))
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
        diff = identity_diff(self.base, made_for, self.base_identity(patch.names))
        if diff.shapes:
            name, made, here = diff.shapes[0]
            raise PatchError(f"{where} was made for a model whose {name} has shape {made}; here it has shape {here}.")
        if diff.values:
            raise PatchError(
                f"{where} was made for another base model: its {diff.values[0]} differs from this one's "
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

    def restore_weights(self, weights: Dict[str, torch.Tensor], meta: Optional[dict] = None) -> None:
        """Continue from edited weights saved earlier (a resumed evaluation, ``eval_progress.py``): they become the
        current weights as they are, bit for bit, recorded as one dense patch (their difference from the base
        weights) on an unedited model."""
        if self.patches:
            raise PatchError("restore_weights: the model already holds patches; restore onto the unedited model.")
        dense, restored = {}, {}
        for name, w in weights.items():
            base = self.base.get_parameter(name).detach()
            if tuple(w.shape) != tuple(base.shape):
                raise PatchError(
                    f"restore_weights: {name} has shape {tuple(w.shape)}; the model's is {tuple(base.shape)}."
                )
            restored[name] = w.to(device=base.device, dtype=base.dtype)
            dense[name] = base.float() - restored[name].float()
        self.patches.append(Patch({}, {}, {}, dict(meta or {}, restored=True), dense))
        self.weights = restored

    # -- running it ---------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **extra) -> torch.Tensor:
        """The logits of the edited model; ``extra`` forward arguments (``position_ids``, ``logits_to_keep``) are
        passed on."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **extra}
        return call_with_weights(self.base, self.weights, kwargs)

    def greedy(self, prompt: Sequence[int], n: int, eos: Optional[int] = None) -> List[int]:
        """Up to ``n`` greedy tokens after ``prompt`` (a causal LM's ids), stopping after ``eos``."""
        return self.greedy_batch([prompt], n, eos)[0]

    @torch.no_grad()
    def greedy_batch(
        self, prompts: Sequence[Sequence[int]], n: int, eos: Optional[int] = None, pad_id: int = 0
    ) -> List[List[int]]:
        """Per prompt, up to ``n`` greedy tokens after it, stopping after ``eos``: the tokens :meth:`greedy` gives
        for that prompt alone. The prompts run together, left-padded (``pad_id``) with their attention mask and
        position ids counted from each prompt's first token, and each new token runs on the key/value cache; a
        model that returns no cache is rerun on the whole sequences at each step, and one whose forward takes no
        position ids runs the prompts one at a time."""
        takes_positions = forward_takes(self.base, "position_ids")
        if len(prompts) > 1 and not takes_positions:
            return [self.greedy_batch([p], n, eos, pad_id)[0] for p in prompts]
        ids, mask = (t.to(self.device) for t in pad_rows(prompts, pad_id, left=True))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        name = cache_argument(self.base)

        def inputs(input_ids, attention_mask, position_ids, **extra):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True, **extra}
            if takes_positions:  # else a single unpadded prompt: the model's own positions are the same
                kwargs["position_ids"] = position_ids
            return kwargs

        kwargs = inputs(ids, mask, positions)
        new: List[List[int]] = [[] for _ in prompts]
        running = [True] * len(prompts)
        for _ in range(n):
            out = output_with_weights(self.base, self.weights, kwargs)
            nxt = logits_of(out)[:, -1].argmax(-1)
            for r, token in enumerate(nxt.tolist()):
                if running[r]:
                    new[r].append(token)
                    running[r] = token != eos
            if not any(running):
                break
            past = getattr(out, name, None)
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            if past is None:  # no cache: the whole sequences again
                ids = torch.cat([ids, nxt[:, None]], 1)
                kwargs = inputs(ids, mask, positions)
            else:
                kwargs = inputs(nxt[:, None], mask, positions[:, -1:], **{name: past})
        return new

    # -- materialising and saving ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The base model's state dict with the edited weights substituted."""
        return state_dict_with(self.base, self.weights)

    def apply_to(self, model: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """Write the edited weights into ``model`` (a copy of the base) in place; returns the original weights, which
        ``restore(model, originals)`` puts back bit for bit."""
        originals = {}
        with torch.no_grad():
            for name, w in self.weights.items():
                param = model.get_parameter(name)
                originals[name] = param.detach().clone()
                param.copy_(w.to(param.device, param.dtype))
        return originals

    @staticmethod
    def restore(model: torch.nn.Module, originals: Dict[str, torch.Tensor]) -> None:
        """Put back the weights :meth:`apply_to` replaced."""
        with torch.no_grad():
            for name, w in originals.items():
                model.get_parameter(name).copy_(w)

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
