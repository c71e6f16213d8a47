"""MEND's settings, the ``mend`` group (``mend.lr``, ``mend.rank``, ...): their types and defaults, their ranges and
the checks that span several of them. Torch-free: read while the configuration is composed and validated, before
anything loads. The editor itself is in ``editor.py``."""

from __future__ import annotations

from dataclasses import dataclass

from errors import ConfigError
from ranges import STEP, Range

EDITOR = "MEND"  # the editor's class in algs/mend/editor.py


@dataclass
class MendConfig:
    # Outer optimisation: the paper's values, identical across models and datasets. Only the CPU demo schedules
    # (config/schedule/, chosen by the embedded models' configs smollm2 and minilm) change them.
    lr: float = 1e-6  # Adam learning rate of the editor MLPs
    lr_lr: float = 1e-4  # Adam learning rate of the learned per-weight edit step sizes
    edit_lr: float = 1e-4  # initial per-weight edit step size alpha_l
    rank: int = 1920  # rank of each editor MLP's layers, capped at the MLP's width (check_shapes warns above it)
    n_hidden: int = 1  # hidden layers of each editor MLP (each a low-rank residual layer)
    init: str = "id"  # id | xavier
    norm: bool = True
    combine: bool = True
    one_sided: bool = False
    x_only: bool = False
    delta_only: bool = False
    shared: bool = True
    # paper: W~ = W - alpha * g~ (the paper's rule); original: W~ = W + alpha * g~, as the original code applies
    # it (with a positive initial edit_lr its first edits step uphill, and training learns to flip the sign).
    update_rule: str = "paper"


SETTINGS = MendConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    **dict.fromkeys(("lr", "lr_lr", "edit_lr"), STEP),
    "rank": Range(1, 2**16, why="no edited layer is that wide, and each editor MLP's rank is capped at its width"),
    "n_hidden": Range(0, 1024, why="every layer is allocated at once"),
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "Adam learning rate of the editor MLPs",
    "edit_lr": "initial per-weight edit step size alpha",
    "lr_lr": "Adam learning rate of the edit step sizes",
    "rank": "rank of the editor MLPs' layers (capped at each MLP's width)",
    "n_hidden": "hidden layers of each editor MLP",
    "update_rule": "paper: W - alpha * g~; original: W + alpha * g~, the original code's rule",
}

# Keys that earlier versions spelled otherwise (old name -> new name): MEND's rates were at the top level.
RENAMED_KEYS = {"lr": "mend.lr", "lr_lr": "mend.lr_lr", "edit_lr": "mend.edit_lr"}


def check(cfg) -> None:
    """The checks that span several keys of the group."""
    m = cfg.mend
    variants = [k for k in ("one_sided", "x_only", "delta_only") if m[k]]
    if m.combine and variants:
        raise ConfigError(
            f"mend.combine=True cannot be used with mend.{variants[0]}=True: the combined MLP transforms "
            f"both sides at once. Set mend.combine=False to use mend.{variants[0]}."
        )
    if len(variants) > 1:
        raise ConfigError(f"mend.{variants[0]} and mend.{variants[1]} are exclusive; set only one.")
    if m.init not in ("id", "xavier"):
        raise ConfigError(f"mend.init={m.init!r}: expected 'id' or 'xavier'.")
    if m.update_rule not in ("paper", "original"):
        raise ConfigError(
            f"mend.update_rule={m.update_rule!r}: expected 'paper' (W - alpha * g) or 'original' (W + alpha * g)."
        )


def check_shapes(cfg, shapes) -> list:
    """A warning when ``mend.rank`` is above the width of every editor MLP the edited weights (name -> shape) get:
    each MLP's rank is capped at its width, so the rank given does not act as set. The widest MLP takes both sides
    of a weight with ``mend.combine``, the smaller side with ``mend.one_sided``, a side otherwise."""
    m = cfg.mend
    widths = {}
    for name, shape in shapes.items():
        rows, cols = shape[0], shape[-1]
        widths[name] = rows + cols if m.combine else min(rows, cols) if m.one_sided else max(rows, cols)
    if not widths or m.rank <= max(widths.values()):
        return []
    name = max(widths, key=widths.get)
    return [
        f"mend.rank={m.rank} is above the width of every editor MLP of this model (at most {widths[name]}, for "
        f"{name} of shape {' x '.join(map(str, shapes[name]))}{' with mend.combine' if m.combine else ''}): each "
        f"MLP's rank is capped at its width, so this run is the same as with mend.rank={widths[name]}."
    ]
