"""MEMIT's settings, the ``memit`` group: the edited blocks, the target vector's optimisation, the key statistics (see
algs/locate/__init__.py) and the weight of the statistics in the update. Torch-free. The editor is in ``editor.py``;
what it computes is in docs/locate_edit.md."""

from __future__ import annotations

from dataclasses import dataclass

from algs.locate import BATCHED_RANGES as LOCATE_RANGES
from algs.locate import HELP as LOCATE_HELP
from algs.locate import BatchedTargetSettings, check_inner_params, resolve_locate
from ranges import Range

EDITOR = "MEMIT"  # the editor's class in algs/memit/editor.py


@dataclass
class MEMITConfig(BatchedTargetSettings):
    # Mass-editing memory in a transformer (Meng et al., 2023). Defaults: kmeng01/memit hparams/MEMIT/gpt2-xl.json;
    # other models' layers and settings are in their model files' locate blocks (GPT-J's: v_num_grad_steps 25,
    # mom2_update_weight 15000).
    clamp_norm_factor: float = 0.75
    mom2_update_weight: float = 20000.0  # lambda in (lambda C + K K^T)^-1 (their mom2_update_weight)


SETTINGS = MEMITConfig
RANGES = {
    **LOCATE_RANGES,
    "mom2_update_weight": Range(0, 1e12, low_open=True, why="0 drops the key statistics and leaves the solve singular"),
}
HELP = dict(LOCATE_HELP)


def resolve(cfg, given) -> None:
    """The weights it edits and the model's published settings (algs.locate.resolve_locate)."""
    resolve_locate(cfg, "memit", given)


def check(cfg) -> None:
    if cfg.alg == "memit":
        check_inner_params(cfg, "memit", one=False)
