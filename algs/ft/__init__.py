"""FT's settings, the ``ft`` group (``ft.lr``, ``ft.locality.*``, ...): their types and defaults and their ranges.
Torch-free: read while the configuration is composed and validated, before anything loads. The editor itself is in
``editor.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from errors import ConfigError
from ranges import (
    BATCH,
    COUNT,
    FASTEST_STEPS_PER_SECOND,
    LOSS_WEIGHT,
    MAX_PLAUSIBLE_STEPS,
    OPTIMISERS,
    STEP,
    Range,
    duration,
    optimiser_message,
)

EDITOR = "FT"  # the editor's class in algs/ft/editor.py


@dataclass
class FTLocalityConfig:
    # FT+KL: add the KL to the unedited model on locality batches drawn from the training set at edit time.
    enabled: bool = False
    cedit: float = 1e-2  # loss = KL + cedit * edit loss
    batch_size: int = 1  # locality examples per fine-tuning step


@dataclass
class FTConfig:
    # Fine-tuning the edited weights on the edit example; no training.
    lr: float = 5e-6  # learning rate of the fine-tuning optimizer (the original's ft.yaml edit_lr)
    opt: str = "RMSprop"  # a torch.optim class name
    max_edit_steps: int = 100  # stop after this many steps even if the target is not yet the greedy prediction
    time_limit: Optional[float] = None  # seconds per edit (None: no limit)
    rank: Optional[int] = None  # fine-tune a rank-r residual U V (U random, V zero) instead of a full one
    init_std: float = 0.01  # std of U's initialisation when rank is set
    locality: FTLocalityConfig = field(default_factory=FTLocalityConfig)
    verbose: bool = False  # log every fine-tuning step


SETTINGS = FTConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    "lr": STEP,
    "max_edit_steps": COUNT,
    "time_limit": Range(0, low_open=True, null="no limit"),
    "rank": Range(1, 2**16, null="a full-rank residual", why="a residual of this rank is allocated at once"),
    "init_std": STEP,
    "locality.cedit": LOSS_WEIGHT,
    "locality.batch_size": BATCH,
}

# Keys that earlier versions spelled otherwise (old name -> new name).
RENAMED_KEYS = {"ft.edit_lr": "ft.lr"}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "learning rate of the fine-tuning optimizer",
    "max_edit_steps": "fine-tuning steps per edit at most (fewer once the target is the greedy prediction)",
    "time_limit": "seconds per edit at most (null: no limit)",
    "rank": "fine-tune a rank-r residual U V instead of a full one (null: full)",
    "locality.enabled": "FT+KL: add the KL to the unedited model on locality batches",
}


def check(cfg) -> None:
    """ft.opt names an optimiser of torch.optim; a step budget per edit beyond a year at the fastest step rate assumed
    (ranges.MAX_PLAUSIBLE_STEPS) needs ft.time_limit to stop an edit whose target never becomes the greedy
    prediction."""
    if cfg.ft.opt not in OPTIMISERS:
        raise ConfigError(optimiser_message("ft.opt", cfg.ft.opt))
    if cfg.ft.time_limit is None and cfg.ft.max_edit_steps > MAX_PLAUSIBLE_STEPS:
        raise ConfigError(
            f"ft.max_edit_steps={cfg.ft.max_edit_steps}: expected at most {MAX_PLAUSIBLE_STEPS} with no "
            f"ft.time_limit: even at {FASTEST_STEPS_PER_SECOND} steps/s one edit could take "
            f"{duration(cfg.ft.max_edit_steps / FASTEST_STEPS_PER_SECOND)}. Lower it, or bound each edit by the "
            f"clock with ft.time_limit=<seconds>."
        )


def check_shapes(cfg, shapes) -> list:
    """Refuse an ``ft.rank`` above the rank a residual of an edited weight (name -> shape) can have: U V would hold
    more parameters than the full residual, with no more it can express."""
    rank = cfg.ft.rank
    for name, shape in shapes.items():
        if rank is not None and rank > min(shape):
            raise ConfigError(
                f"ft.rank={rank}: expected at most {min(shape)}, the largest rank a residual of {name} "
                f"({' x '.join(map(str, shape))}) can have; use a smaller ft.rank, or ft.rank=null for a full one."
            )
    return []
