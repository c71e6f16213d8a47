"""AlphaEdit's settings, the ``alphaedit`` group: the edited blocks, the target vector's optimisation, the key
statistics (see algs/locate/__init__.py), the null-space threshold and the ridge. Torch-free. The editor is in
``editor.py``; what it computes is in docs/locate_edit.md."""

from __future__ import annotations

from dataclasses import dataclass

from algs.locate import BATCHED_RANGES as LOCATE_RANGES
from algs.locate import HELP as LOCATE_HELP
from algs.locate import BatchedTargetSettings, check_inner_params, resolve_locate
from ranges import Range

EDITOR = "AlphaEdit"  # the editor's class in algs/alphaedit/editor.py


@dataclass
class AlphaEditConfig(BatchedTargetSettings):
    # Null-space constrained knowledge editing (Fang et al., ICLR 2025). Defaults: jianghoucheng/AlphaEdit
    # hparams/AlphaEdit/gpt2-xl.json; other models' layers and settings are in their model files' locate blocks
    # (GPT-J's: v_num_grad_steps 25; Llama3-8B's: v_num_grad_steps 25, v_lr 0.1).
    clamp_norm_factor: float = 0.75
    nullspace_threshold: float = 2e-2  # eigenvalues of C below it span the preserved keys' null space
    L2: float = 10.0  # the ridge added to the projected normal matrix (their L2)


SETTINGS = AlphaEditConfig
RANGES = {
    **LOCATE_RANGES,
    "nullspace_threshold": Range(0, 1e12, low_open=True, why="0 leaves no direction to write to"),
    "L2": Range(0, 1e12, low_open=True, why="0 leaves the projected solve singular"),
}
HELP = dict(LOCATE_HELP)


def resolve(cfg, given) -> None:
    """The weights it edits and the model's published settings (algs.locate.resolve_locate)."""
    resolve_locate(cfg, "alphaedit", given)


def check(cfg) -> None:
    if cfg.alg == "alphaedit":
        check_inner_params(cfg, "alphaedit", one=False)
