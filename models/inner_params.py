"""The check of ``model.inner_params`` (the weights an editor edits), the name of the module owning a parameter, and
the layout of an edited weight in its layer."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers.pytorch_utils import Conv1D

from errors import InnerParamsError


def edited_module_name(param_name: str) -> str:
    """Name of the module that owns a parameter: ``"a.b.weight"`` -> ``"a.b"`` (``""`` for a root parameter)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


def weight_layout(module: torch.nn.Module, param_name: str, editor: str) -> tuple[bool, int, int]:
    """(fan_in_fan_out, d_in, d_out) of an edited weight, decided by the layer type: nn.Linear stores W as
    (d_out, d_in), GPT-2's Conv1D as (d_in, d_out). Any other layer: a TypeError naming the parameter and ``editor``."""
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return True, d_in, d_out
    if isinstance(module, torch.nn.Linear):
        d_out, d_in = module.weight.shape
        return False, d_in, d_out
    raise TypeError(
        f"model.inner_params entry {param_name!r} belongs to a {type(module).__name__}; {editor} edits the weights "
        f"of nn.Linear and transformers Conv1D layers only. Choose MLP projection weights in model.inner_params."
    )


@contextmanager
def capture_calls(model: torch.nn.Module, module_names: list[str]) -> Iterator[dict[str, dict[str, list]]]:
    """Record each named module's input and output while the block runs: name -> {"x": [inputs, detached],
    "out": [outputs, as the graph holds them]}, one entry per call. The gradients dL/d(out) can then be asked of
    autograd for these outputs alone (no weight gradient computed). All hooks are removed on exit, whatever happens
    inside the block; nothing is left on the model or its parameters."""
    records: dict[str, dict[str, list]] = {n: {"x": [], "out": []} for n in module_names}
    handles = []

    def make_hook(name):
        def forward_hook(module, inputs, output):
            records[name]["x"].append(inputs[0].detach())
            records[name]["out"].append(output)

        return forward_hook

    try:
        for name in module_names:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield records
    finally:
        for h in handles:
            h.remove()


def check_inner_params(model: torch.nn.Module, inner_params: Iterable[str]) -> None:
    """Check that every name in ``model.inner_params`` is a distinct 2-D weight of ``model``.

    All problems are reported in one :class:`InnerParamsError`, with valid names close to the bad ones.
    """
    names = list(inner_params)
    unique = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    two_d = [n for n, p in unique.items() if p.dim() == 2]

    def suggestions(bad: list[str]) -> str:
        picked: list[str] = []
        for b in bad:
            for m in difflib.get_close_matches(b, two_d, n=5, cutoff=0.5):
                if m not in picked and m not in names:
                    picked.append(m)
        if not picked:  # nothing similar: the last weights of the model (usually those of its last blocks)
            picked = [n for n in two_d if n not in names][-5:]
        return ", ".join(picked[:5])

    fix = "Fix model.inner_params in the model's YAML or on the command line, e.g. 'model.inner_params=[name1,name2]'."
    if not names:
        raise InnerParamsError(
            f"model.inner_params is empty: list the 2-D weights to edit, e.g. {suggestions([])}. {fix}"
        )

    errors: list[str] = []
    bad: list[str] = []
    seen = set()
    for n in names:
        if not isinstance(n, str):
            errors.append(f"  - {n!r}: not a parameter name (a string)")
            continue
        if n in seen:
            errors.append(f"  - {n}: listed more than once")
            bad.append(n)
            continue
        seen.add(n)
        if n not in every:
            errors.append(f"  - {n}: not a parameter of the model")
            bad.append(n)
        elif n not in unique:
            owner = next((u for u, p in unique.items() if p is every[n]), "?")
            errors.append(f"  - {n}: is tied to {owner} (the same tensor); list {owner} instead")
            bad.append(n)
        elif unique[n].dim() != 2:
            errors.append(f"  - {n}: shape {tuple(unique[n].shape)} is not a 2-D weight")
            bad.append(n)
    if errors:
        raise InnerParamsError(
            f"model.inner_params has {len(errors)} invalid entr{'y' if len(errors) == 1 else 'ies'} for "
            f"{type(model).__name__} ({len(two_d)} 2-D weights):\n"
            + "\n".join(errors)
            + f"\nValid 2-D weights close to these names: {suggestions(bad)}.\n{fix}"
        )
