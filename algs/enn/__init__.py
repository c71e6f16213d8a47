"""ENN's settings, the ``enn`` group: their types and defaults and their ranges. Torch-free: read while the
configuration is composed and validated, before anything loads. The editor itself is in ``editor.py``."""

from __future__ import annotations

from dataclasses import dataclass

from errors import ConfigError
from ranges import STEP, Range

EDITOR = "ENN"  # the editor's class in algs/enn/editor.py


@dataclass
class ENNConfig:
    # Editable Neural Networks (Sinitsin et al., 2020), at the original's settings (its config.yaml, which enn.yaml
    # does not override). train_base (top level) also trains every parameter of the base model (the original's
    # outer_parameters() is all of them) with KL(original || current) on the locality inputs.
    lr: float = 1e-5  # Adam learning rate of the trained base model (train_base=True)
    edit_lr: float = 1e-2  # initial per-weight step size of the inner SGD steps
    lr_lr: float = 1e-3  # Adam learning rate of those step sizes
    n_edit_steps: int = 1  # SGD steps on the edit loss per edit
    first_order: bool = False  # drop the second-order term (treat the inner gradients as constants)
    # How the step sizes train: separate: in their own optimiser at lr_lr; original: as
    # the original code trains them, in the main optimiser at lr (its step-size optimiser never moves them).
    step_sizes: str = "separate"


SETTINGS = ENNConfig

# enn.step_sizes: "separate" trains the step sizes in their own optimiser at enn.lr_lr; "original" in the main
# optimiser at enn.lr, as the original code does.
STEP_SIZES = ("separate", "original")

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    **dict.fromkeys(("lr", "edit_lr", "lr_lr"), STEP),
    "n_edit_steps": Range(1, 1024, why="every inner step is kept in memory for the backward pass"),
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "Adam learning rate of the trained base model (train_base=True)",
    "edit_lr": "initial per-weight step size of the inner SGD steps",
    "lr_lr": "Adam learning rate of those step sizes",
    "n_edit_steps": "SGD steps on the edit loss per edit",
}


def check(cfg) -> None:
    """The checks of the group's values that a range cannot express."""
    if cfg.enn.step_sizes not in STEP_SIZES:
        raise ConfigError(
            f"enn.step_sizes={cfg.enn.step_sizes!r}: expected 'separate' (the step sizes in their own optimiser "
            f"at enn.lr_lr) or 'original' (in the main optimiser at enn.lr, as the original code trains them)."
        )
