"""RLEdit's settings, the ``rledit`` group (``rledit.seq_len``, ``rledit.back_depth``, ...): their types and defaults,
taken from the original code (zhrli324/RLEdit at c6576a1: ``config/editor/rledit.yaml``, ``config/config.yaml``,
``config/dataset/zsre.yaml``, ``nets.py``), and their ranges. Torch-free: read while the configuration is composed
and validated, before anything loads. The editor itself is in ``editor.py``; what it computes is in docs/rledit.md."""

from __future__ import annotations

from dataclasses import dataclass

from algs.malmen import RANGES as MALMEN_RANGES
from algs.malmen import rank_warnings
from ranges import LOSS_WEIGHT, Range

EDITOR = "RLEdit"  # the editor's class in algs/rledit/editor.py


@dataclass
class RLEditConfig:
    # The network and its solve: MALMEN's, at the original's values (config/editor/rledit.yaml unless said otherwise).
    lr: float = 1e-5  # Adam learning rate of the whole network, step sizes and ridges included (editor.meta_lr)
    edit_lr: float = 1e-6  # initial learned step size of every edited weight (editor.lr)
    log_ridge: float = 0.0  # initial learned lambda of every edited weight, ridge = e^lambda (nets.py: lamda = 0)
    rank: int = 1024  # rank of each block's low-rank map (editor.rank)
    n_blocks: int = 4  # residual blocks of the network (editor.n_blocks)
    chunk_size: int = 4  # edits per language-model pass and per normalisation update (dataset.batch_size)
    net_chunk: int = 128  # gradient rows per pass of the network (editor.batch_size)
    # Training over a sequence of edits (editor/rledit.py, RLEDIT.train).
    seq_len: int = 400  # batches of edits applied one after another in one training step (num_seq, run.sh)
    back_depth: int = 10  # the batches whose losses a step of the sequence sums: its own and the ones before it
    time_decay: float = 0.95  # the weight of the batch j steps back is time_decay^j
    reg_coef: float = 1e-4  # weight of the update-size penalty reg_coef * sum |dW|^2 in the logged loss
    # Not the original's: True also back-propagates the penalty (the original adds it to the loss as a constant: its
    # update is computed without a graph, so the penalty changes no gradient).
    reg_gradient: bool = False


SETTINGS = RLEditConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    **MALMEN_RANGES,  # the network's keys, as MALMEN's
    "seq_len": Range(1, 2**20, why="a training step holds one batch of each of them"),
    "back_depth": Range(1, 2**20, why="a step's loss counts at least its own batch"),
    "time_decay": Range(0, 1, why="an earlier batch weighs at most what the current one does (0: its own only)"),
    "reg_coef": LOSS_WEIGHT,
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "Adam learning rate of the network, step sizes and ridges",
    "seq_len": "batches of edits applied one after another in one training step",
    "back_depth": "batches whose losses each step of the sequence sums (its own included)",
    "time_decay": "weight time_decay^j of the batch j steps back",
    "reg_coef": "weight of the penalty on the update's size (logged; trained with reg_gradient=true)",
}


def check_shapes(cfg, shapes) -> list:
    """A warning when ``rledit.rank`` is above the width of every network the edited weights get (as MALMEN's)."""
    return rank_warnings("rledit", "RLEdit", cfg.rledit.rank, shapes)
