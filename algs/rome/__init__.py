"""ROME's settings, the ``rome`` group: the target vector's optimisation and the key statistics (see
algs/locate/__init__.py for the keys and their origin). Torch-free. The editor is in ``editor.py``; what it computes
is in docs/locate_edit.md."""

from __future__ import annotations

from dataclasses import dataclass

from algs.locate import RANGES as LOCATE_RANGES
from algs.locate import TargetSettings, check_inner_params

EDITOR = "ROME"  # the editor's class in algs/rome/editor.py


@dataclass
class ROMEConfig(TargetSettings):
    # Rank-one model editing (Meng et al., 2022). Defaults: kmeng01/rome hparams/ROME/gpt2-xl.json (GPT-J's
    # EleutherAI_gpt-j-6B.json differs only in its layer, 5, and its loss layer).
    clamp_norm_factor: float = 4.0


SETTINGS = ROMEConfig
RANGES = dict(LOCATE_RANGES)


def check(cfg) -> None:
    if cfg.alg == "rome":
        check_inner_params(cfg, "rome", one=True)
