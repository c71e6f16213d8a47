"""EFK's settings, the ``efk`` group: their types and defaults and their ranges. Torch-free: read while the
configuration is composed and validated, before anything loads. The editor itself is in ``editor.py``."""

from __future__ import annotations

from dataclasses import dataclass

from ranges import STEP, WIDTH

EDITOR = "EFK"  # the editor's class in algs/efk/editor.py


@dataclass
class EFKConfig:
    # KnowledgeEditor (De Cao et al., 2021), as run in the MEND paper.
    lr: float = 1e-5  # Adam learning rate of the editor (the original's efk.yaml)
    lstm_hidden: int = 512  # hidden size of each direction of the bidirectional LSTM over the condition
    condition_dim: int = 768  # size of the condition vector the LSTM's output is projected to
    hidden_dim: int = 512  # hidden size of each weight's conditioned MLP
    max_scale: float = 1.0  # the update is max_scale * sigmoid(s) * (grad * A + B)


SETTINGS = EFKConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    "lr": STEP,
    **dict.fromkeys(("lstm_hidden", "condition_dim", "hidden_dim"), WIDTH),
    "max_scale": STEP,
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "Adam learning rate of the editor",
    "lstm_hidden": "hidden size of each direction of the LSTM over the condition",
    "hidden_dim": "hidden size of each weight's conditioned MLP",
}
