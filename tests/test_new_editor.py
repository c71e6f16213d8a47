"""Adding an editor touches only its own folder and its YAML file: a toy editor (a gradient step on the edit loss),
written into a copy of the project as ``algs/toy/__init__.py`` (settings), ``algs/toy/editor.py`` (the class) and
``config/alg/toy.yaml``, is found by the registry, composes with ``+alg=toy``, has its ranges and its check applied
with its keys named, and edits a tiny model through ``editor_class("toy")``. Nothing else in the copy changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import setuptools

from algs import ALGS

ROOT = Path(__file__).resolve().parent.parent
# What the toy needs of the project: the code and the configs (not the tests, docs, tools or caches).
LEFT_OUT = (".venv", ".git", "tests", "docs", "outputs", "scripts", "benchmarks", "build", "__pycache__", "*.egg-info")

TOY_FILES = {
    "algs/toy/__init__.py": '''
"""The toy editor's settings, the ``toy`` group."""

from dataclasses import dataclass

from errors import ConfigError
from ranges import STEP, Range

EDITOR = "Toy"


@dataclass
class ToyConfig:
    step: float = 0.1  # the size of the step on the edit loss's gradient
    n_steps: int = 1
    direction: str = "descend"  # descend | ascend


SETTINGS = ToyConfig
RANGES = {"step": STEP, "n_steps": Range(1, 8, why="a toy")}


def check(cfg) -> None:
    if cfg.toy.direction not in ("descend", "ascend"):
        raise ConfigError(f"toy.direction={cfg.toy.direction!r}: expected descend or ascend.")
''',
    "algs/toy/editor.py": '''
"""The toy editor: n_steps plain gradient steps on the edit loss."""

import torch

from editable_model import EditableModel


class Toy(EditableModel):
    needs_training = False

    def edit(self, batch, condition=None, diagnostics=False):
        sign = -1.0 if self.config.toy.direction == "descend" else 1.0
        weights = {n: self.current_weight(n).detach() for n in self.inner_params}
        for _ in range(self.config.toy.n_steps):
            weights = {n: w.requires_grad_(True) for n, w in weights.items()}
            nll = self.loss_with(batch, weights)["nll"]
            grads = torch.autograd.grad(nll, list(weights.values()))
            weights = {n: (w + sign * self.config.toy.step * g).detach() for (n, w), g in zip(weights.items(), grads)}
        return self.with_weights(weights), {"toy/nll_before": float(nll)}

    def with_weights(self, weights):
        return Toy(self.model, self.config, weights)

    def outer_parameters(self):
        return []
''',
    "config/alg/toy.yaml": """# @package _global_
alg: toy
eval_only: true
toy:
  step: 0.5
""",
}

# Run in the copy: the registry, the schema, validation and the editor class, as run.py and edit.py use them.
CHECKS = """
import json, transformers
from config_schema import RANGES, ConfigError, compose_config, config_for, ModelConfig, validate_config
from algs import ALGS, editor_class
from data_classes import DATASETS
from data_classes.synthetic import SyntheticEdits
from editable_model import EditableModel

out = {"algs": list(ALGS)}
cfg = compose_config(["+alg=toy", "+experiment=gen", "+model=smollm2"])
validate_config(cfg, algs=ALGS, tasks=DATASETS)
out["composed"] = [cfg.alg, cfg.toy.step, cfg.toy.n_steps, cfg.eval_only, cfg.mend.rank]
out["ranges"] = sorted(k for k in RANGES if k.startswith("toy."))
refusals = []
for override in ("toy.step=0", "toy.n_steps=9", "toy.direction=sideways"):
    try:
        validate_config(compose_config(["+alg=toy", "+experiment=gen", "+model=smollm2", override]), ALGS, DATASETS)
        refusals.append(None)
    except ConfigError as e:
        refusals.append(str(e))
out["refusals"] = refusals
cls = editor_class("toy")
cls.check_config(cfg)
out["class"] = [cls.__name__, issubclass(cls, EditableModel)]

transformers.set_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
inner = ["transformer.h.1.mlp.c_fc.weight"]
tiny = config_for(ModelConfig(name="tiny", class_name="GPT2LMHeadModel", inner_params=inner), "gen", "toy")
batch = next(SyntheticEdits(8, seed=0).edit_generator(2, n=1))["edit_inner"]
edited, info = cls(model, tiny).edit(batch)
out["nll"] = [info["toy/nll_before"], float(edited.loss_with(batch, {})["nll"])]
out["edited"] = sorted(edited.weights)
print(json.dumps(out))
"""


def test_a_new_editor_is_its_folder_and_its_yaml(tmp_path):
    tree = tmp_path / "project"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*LEFT_OUT))
    before = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    for name, text in TOY_FILES.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text.lstrip("\n"))
    after = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    assert after - before == set(TOY_FILES)
    include = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "algs.toy" in setuptools.find_packages(str(tree), include=include)  # packaged without a line of its own

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", CHECKS], cwd=tree, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["algs"] == sorted([*ALGS, "toy"])  # the project's editors, and the toy beside them
    assert out["composed"] == ["toy", 0.5, 1, True, 1920]  # its YAML over its defaults; the other groups' defaults
    assert out["ranges"] == ["toy.n_steps", "toy.step"]
    assert out["refusals"][0].startswith("toy.step=0.0: expected a finite number in (0, 1000]")
    assert out["refusals"][1].startswith("toy.n_steps=9: expected an integer in [1, 8]; a toy.")
    assert out["refusals"][2] == "toy.direction='sideways': expected descend or ascend."
    assert out["class"] == ["Toy", True]
    assert out["nll"][1] < out["nll"][0]  # the step went down the edit loss
    assert out["edited"] == ["transformer.h.1.mlp.c_fc.weight"]

    # the command line: the toy's range refused in one line before anything loads, exit status 2
    cmd = [sys.executable, "-m", "run", "+alg=toy", "+experiment=gen", "+model=smollm2", "toy.step=0"]
    proc = subprocess.run(cmd + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tree, capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "toy.step=0.0: expected" in lines[0], lines
