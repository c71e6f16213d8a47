"""FT's settings, the ``ft`` group (``ft.lr``, ``ft.locality.*``, ...): their types and defaults and their ranges.
Torch-free: read while the configuration is composed and validated, before anything loads. The editor itself is in
``editor.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ranges import BATCH, COUNT, LOSS_WEIGHT, STEP, Range

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
