"""MALMEN's settings, the ``malmen`` group (``malmen.lr``, ``malmen.rank``, ...): their types and defaults, taken from
the original code (ChenmienTan/malmen, ``config/editor/malmen.yaml`` and ``config/data/zsre.yaml``), and their
ranges. Torch-free: read while the configuration is composed and validated, before anything loads. The editor itself
is in ``editor.py``; what it computes is in docs/malmen.md."""

from __future__ import annotations

from dataclasses import dataclass

from ranges import BATCH, STEP, WIDTH, Range

EDITOR = "MALMEN"  # the editor's class in algs/malmen/editor.py


@dataclass
class MalmenConfig:
    # The original's values (config/editor/malmen.yaml unless said otherwise), the same for every model it runs.
    lr: float = 1e-5  # Adam learning rate of the whole network, step sizes and ridges included (editor.meta_lr)
    edit_lr: float = 1e-6  # initial learned step size of every edited weight (editor.lr)
    log_ridge: float = 0.0  # initial learned lambda of every edited weight, ridge = e^lambda (nets.py: lamda = 0)
    rank: int = 1920  # rank of each block's low-rank map (editor.rank), not capped at the width
    n_blocks: int = 2  # residual blocks of the network (editor.n_blocks)
    chunk_size: int = 32  # edits per language-model pass, and per normalisation update (data.batch_size)
    net_chunk: int = 1024  # gradient rows per pass of the network (editor.batch_size)


SETTINGS = MalmenConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    **dict.fromkeys(("lr", "edit_lr"), STEP),
    "log_ridge": Range(-30, 30, why="e^lambda beyond it under- or overflows the solve in float32"),
    "rank": WIDTH,
    "n_blocks": Range(1, 1024, why="a network needs a block; every block is allocated at once"),
    "chunk_size": BATCH,
    "net_chunk": Range(1, 2**24, why="the rows of a chunk go through the network at once"),
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "Adam learning rate of the network, step sizes and ridges",
    "edit_lr": "initial learned step size of every edited weight",
    "rank": "rank of each block's low-rank map (not capped at the width)",
    "n_blocks": "residual blocks of the network",
}


def check_shapes(cfg, shapes) -> list:
    """A warning when ``malmen.rank`` is above the width of every network the edited weights (name -> shape) get
    (the two sides of a weight added): each block's map A B is then full rank, held in more parameters than a full
    map, as the original code allows."""
    return rank_warnings("malmen", "MALMEN", cfg.malmen.rank, shapes)


def rank_warnings(group: str, editor: str, rank: int, shapes) -> list:
    """The warning of ``check_shapes`` for the key ``<group>.rank`` of an editor built on MALMEN's network."""
    widths = {name: shape[0] + shape[-1] for name, shape in shapes.items()}
    if not widths or rank <= max(widths.values()):
        return []
    name = max(widths, key=widths.get)
    return [
        f"{group}.rank={rank} is above the width of every {editor} network of this model (at most {widths[name]}, "
        f"for {name} of shape {' x '.join(map(str, shapes[name]))}): each block's map is full rank at any rank from "
        f"{widths[name]} up, and larger ones only add parameters."
    ]
