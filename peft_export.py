"""An edit as a PEFT LoRA adapter: the patches of an :class:`patches.EditedModel` written so that
``PeftModel.from_pretrained(base_model, out_dir)`` runs the edited model and ``merge_and_unload()`` gives its weights.

A low-rank patch is a LoRA update already. Per edited weight it holds u (N x d_in), v (N x d_out) and alpha with
``W~ = W - alpha * v^T u`` (nn.Linear, W stored d_out x d_in) or ``W - alpha * u^T v`` (GPT-2's Conv1D, stored
d_in x d_out). LoRA adds ``scaling * B A`` (transposed for Conv1D, PEFT's ``fan_in_fan_out``) with A (r x d_in),
B (d_out x r): so A = u, B = -alpha v^T, r = N and scaling 1 (``lora_alpha`` = r), in both layouts. Several patches
on one weight stack their factors (r = the sum of their N).

A patch without a low-rank form (the dense difference of EFK, ENN or fine-tuning, or UltraEdit's update when an edit
has as many positions as inputs) is exported exactly, at full rank: the weight's whole difference D (d_out x d_in)
as B = D, A = the identity (r = d_in), or B = the identity and A = D (r = d_out) when d_out is smaller. The adapter is
then as large as the edited weights themselves, and ``merge_and_unload()`` gives the edited weights bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List

import torch
from safetensors.torch import save_file

from errors import PatchError
from models import edited_module_name
from models.inner_params import weight_layout
from patches import EditedModel, check_output_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the names PeftModel.from_pretrained reads
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraUpdate:
    """The update of one module as LoRA factors: ``W~ = W + B A`` in nn.Linear's layout (transposed for Conv1D)."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    fan_in_fan_out: bool
    full_rank: bool  # a dense difference, factored exactly at full rank

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def lora_updates(model: EditedModel) -> Dict[str, LoraUpdate]:
    """Per edited module (in the order its weights were first patched), the LoRA factors of all of ``model``'s
    patches on it. A :class:`errors.PatchError` for an edited parameter that is not the weight of a Linear or
    Conv1D layer."""
    names: List[str] = []
    for p in model.patches:
        names += [n for n in p.names if n not in names]
    updates = {}
    for name in names:
        module = edited_module_name(name)
        try:
            fan_in_fan_out, d_in, d_out = weight_layout(model.base.get_submodule(module), name, "a LoRA adapter")
        except TypeError as e:
            raise PatchError(str(e)) from None
        if not name.endswith(".weight"):
            raise PatchError(f"{name}: a LoRA adapter updates layer weights only; this patch edits another tensor.")
        on_it = [p for p in model.patches if name in p.names]
        if all(name in p.factors for p in on_it):
            a = torch.cat([p.factors[name][0].detach().float() for p in on_it])
            b = torch.cat([-(p.alphas[name].float() * p.factors[name][1].detach().float()).t() for p in on_it], 1)
            updates[module] = LoraUpdate(a.cpu(), b.cpu(), fan_in_fan_out, False)
            continue
        base = model.base.get_parameter(name).detach().float()
        diff = model.weights[name].detach().float() - base  # W~ - W, in the weight's own layout
        diff = diff.t() if fan_in_fan_out else diff  # (d_out, d_in)
        if d_in <= d_out:
            a, b = torch.eye(d_in, dtype=diff.dtype, device=diff.device), diff
        else:
            a, b = diff, torch.eye(d_out, dtype=diff.dtype, device=diff.device)
        updates[module] = LoraUpdate(a.contiguous().cpu(), b.contiguous().cpu(), fan_in_fan_out, True)
    return updates


def _task_type(model: torch.nn.Module):
    cls = type(model).__name__
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if cls.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    return None  # PeftModel itself


def save_lora_adapter(model: EditedModel, out_dir: str, base_name: str, overwrite: bool = False) -> str:
    """Write ``model``'s patches as a PEFT LoRA adapter of the base model ``base_name`` in ``out_dir``: the
    adapter's config and weights, ``edits.json`` (each patch's record: the requests, the base model's identity) and
    a short README. A non-empty ``out_dir`` needs ``overwrite``."""
    # peft takes about 2 s to import (it loads much of transformers): only an export needs it, not every python -m edit
    from peft import LoraConfig

    if not model.patches:
        raise PatchError("nothing to export as an adapter: the model has no patch.")
    out_dir = os.path.expanduser(out_dir)
    check_output_dir(out_dir, overwrite)
    updates = lora_updates(model)
    ranks = {m: u.rank for m, u in updates.items()}
    r = max(ranks.values())
    # per-module ranks and alphas; the names are regular expressions to PEFT, so they are escaped
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    layouts = {u.fan_in_fan_out for u in updates.values()}
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # scaling = lora_alpha / r = 1: the factors carry the whole update
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=list(updates),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=layouts == {True},  # PEFT decides per layer type anyway (Conv1D or Linear)
        base_model_name_or_path=base_name,
        task_type=_task_type(model.base),
        inference_mode=True,
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {}
    for module, u in updates.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = u.a
        tensors[f"base_model.model.{module}.lora_B.weight"] = u.b
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    full = sorted(m for m, u in updates.items() if u.full_rank)
    record = {
        "base_model": base_name,
        "ranks": ranks,
        "full_rank_modules": full,
        "patches": [p.meta for p in model.patches],
    }
    with open(os.path.join(out_dir, "edits.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(_card(base_name, model, ranks, full))
    return out_dir


def _card(base_name: str, model: EditedModel, ranks: Dict[str, int], full: List[str]) -> str:
    requests = [r for p in model.patches for r in p.meta.get("requests", [])]
    lines = ["---", "library_name: peft", "tags:", "- model-editing", "- lora", "---", ""]
    lines += [
        f"# An edit of {base_name} as a LoRA adapter",
        "",
        f"{len(model.patches)} patch(es) of `{base_name}` ({type(model.base).__name__}), {len(requests)} edit "
        f"request(s); see `edits.json`. Ranks per module: " + ", ".join(f"`{m}` {k}" for m, k in ranks.items()) + ".",
    ]
    if full:
        lines.append(f"Exported at full rank (the dense difference, exactly): {', '.join(f'`{m}`' for m in full)}.")
    lines += [
        "",
        "```python",
        "from peft import PeftModel",
        "edited = PeftModel.from_pretrained(base_model, '<this directory>')  # or .merge_and_unload()",
        "```",
        "",
    ]
    return "\n".join(lines)
