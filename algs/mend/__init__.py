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
    rank: int = 1920
    n_hidden: int = 1
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
    "rank": Range(1, why="a larger rank is capped at each layer's width"),
    "n_hidden": Range(0, 1024, why="every layer is allocated at once"),
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
