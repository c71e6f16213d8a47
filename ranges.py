"""The values a numeric key accepts: :class:`Range`, and the rules that groups of keys share (:data:`STEP`,
:data:`WIDTH`, ...); the optimisers a key may name (:data:`OPTIMISERS`) and the step budget no run can mean
(:data:`MAX_PLAUSIBLE_STEPS`).

Torch-free and importing nothing of the project, so that the schema (``config_schema.py``) and each editor's
settings (``algs/<name>/__init__.py``) can declare their keys' ranges before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

INT64_MAX = 2**63 - 1  # larger integers do not fit the 64-bit integers of torch and numpy


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: finite, ``low <= value <= high`` (``low < value`` with ``low_open``,
    ``value < high`` with ``high_open``), and for an integer key at most :data:`INT64_MAX`. A key the schema
    declares Optional also takes null; ``null`` says what null means. ``why`` says why the bounds are where they
    are (it ends the message)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    null: str = ""
    why: str = ""

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and abs(value) > INT64_MAX:
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        return above_low and below_high

    def message(self, key: str, value) -> str:
        """The one-line refusal: ``max_iters=0: expected an integer >= 1.``"""
        integer = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer" if integer else "a finite number"
        if self.high == math.inf:
            bounds = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            bounds = (
                f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}"
            )
        text = f"{key}={'null' if value is None else value}: expected {kind} {bounds}"
        if integer and abs(value) > INT64_MAX:
            text += f" that fits in 64 bits (at most {INT64_MAX})"
        if self.null:
            text += f", or null ({self.null})"
        return text + (f"; {self.why}." if self.why else ".")


def _number(x: float) -> str:
    if isinstance(x, int) or (float(x).is_integer() and abs(x) < 1e7):
        return str(int(x))
    return f"{x:g}"


# Rules shared by groups of keys.
STEP = Range(0, 1e3, low_open=True, why="a larger step or scale throws the weights out of range in one update")
LOSS_WEIGHT = Range(0, 1e6, why="0 drops the term, far larger weights overflow float32 gradients")
COUNT = Range(1)
BATCH = Range(1, 2**16, why="the rows of a batch go through the model at once")
WIDTH = Range(1, 2**16, why="a layer of this width is allocated at once")
TOKENS = Range(1, 2**17, why="no model this project runs has a longer context")

# The optimisers of torch.optim that a key naming one (opt, ft.opt) may take: those that step without a closure on
# dense gradients of parameters of any shape (not LBFGS, SparseAdam or Muon). tests/test_config_surface.py checks
# that torch.optim has each of them.
OPTIMISERS = ("ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop",
              "Rprop", "SGD")  # fmt: skip


def optimiser_message(key: str, value: str) -> str:
    """The one-line refusal of a name that is not one of :data:`OPTIMISERS`, with the one meant if only the case
    differs."""
    same = [name for name in OPTIMISERS if name.lower() == str(value).lower()]
    hint = f" Did you mean {key}={same[0]}? (the case matters)" if same else ""
    return f"{key}={value!r}: expected an optimiser of torch.optim: {', '.join(OPTIMISERS)}.{hint}"


# A training step (or an editor's fine-tuning step) runs the model forward and backward several times, one pass
# after another: about 1 s on this project's 2-core CPU at distilGPT-2's shape (docs/benchmarks.md). No hardware is
# assumed to run more than FASTEST_STEPS_PER_SECOND of them, so a step budget above a year at that rate (about 3.2
# billion steps) is a typo, not a plan.
FASTEST_STEPS_PER_SECOND = 100
YEAR_SECONDS = 365 * 24 * 3600
MAX_PLAUSIBLE_STEPS = FASTEST_STEPS_PER_SECOND * YEAR_SECONDS


def duration(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps it above 1: ``3.2 hours``, ``31,710 years``."""
    for unit, size in (("years", YEAR_SECONDS), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.0f} {unit}" if seconds >= 100 * size else f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
