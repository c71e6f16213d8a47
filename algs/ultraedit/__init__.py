"""UltraEdit's settings, the ``ultraedit`` group (``ultraedit.lr``, ``ultraedit.ridge``, ``ultraedit.chunk_size``):
their types and defaults and their ranges. Torch-free: read while the configuration is composed and validated,
before anything loads. The editor itself is in ``editor.py``; what it computes is in docs/ultraedit.md."""

from __future__ import annotations

from dataclasses import dataclass

from ranges import BATCH, STEP, Range

EDITOR = "UltraEdit"  # the editor's class in algs/ultraedit/editor.py


@dataclass
class UltraEditConfig:
    # Training-free lifelong editing (Gu et al., 2025). The defaults are the authors' (config/editor/ultraedit.yaml
    # and the dataset configs of XiaojieGu/UltraEdit).
    lr: float = 1e-6  # scale of the target output shift: v_i = -lr * |k^_i|^2 * g^_i (the authors' editor.lr)
    ridge: float = 1.0  # lambda of the per-layer ridge solve (K^T K + lambda I) dW = K^T V (the authors' identity)
    chunk_size: int = 10  # edits per forward/backward pass and per statistics update (the authors' dataset.batch_size)


SETTINGS = UltraEditConfig

# The range of every numeric key of the group, by its name in the group.
RANGES = {
    "lr": STEP,
    "ridge": Range(
        0, 1e6, low_open=True, why="0 leaves the solve singular whenever an update has fewer positions than inputs"
    ),
    "chunk_size": BATCH,
}

# A one-line description of the frequently used keys, for python -m run --help.
HELP = {
    "lr": "scale of the target output shift",
    "ridge": "lambda of the per-layer ridge solve",
    "chunk_size": "edits per gradient pass and statistics update",
}
