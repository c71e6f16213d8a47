"""ROME's settings, the ``rome`` group: the edited block, the target vector's optimisation and the key statistics (see
algs/locate/__init__.py for the keys and their origin). Torch-free. The editor is in ``editor.py``; what it computes
is in docs/locate_edit.md."""

from __future__ import annotations

from dataclasses import dataclass

from algs.locate import HELP as LOCATE_HELP
from algs.locate import RANGES as LOCATE_RANGES
from algs.locate import TargetSettings, check_inner_params, resolve_locate

EDITOR = "ROME"  # the editor's class in algs/rome/editor.py


@dataclass
class ROMEConfig(TargetSettings):
    # Rank-one model editing (Meng et al., 2022). Defaults: kmeng01/rome hparams/ROME/gpt2-xl.json; the layer and
    # the settings published for other models are in their model files' locate blocks (config/model/gptj.yaml, ...).
    clamp_norm_factor: float = 4.0


SETTINGS = ROMEConfig
RANGES = dict(LOCATE_RANGES)
HELP = dict(LOCATE_HELP)


def resolve(cfg, given) -> None:
    """The weights it edits and the model's published settings (algs.locate.resolve_locate)."""
    resolve_locate(cfg, "rome", given)


def check(cfg) -> None:
    if cfg.alg == "rome":
        check_inner_params(cfg, "rome", one=True)
