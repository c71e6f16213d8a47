"""The check of ``model.inner_params`` (the weights MEND edits) and the name of the module owning a parameter."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch

from errors import InnerParamsError


def edited_module_name(param_name: str) -> str:
    """Name of the module that owns a parameter: ``"a.b.weight"`` -> ``"a.b"`` (``""`` for a root parameter)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


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
