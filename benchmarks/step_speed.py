"""The cost of MEND's training step, of one edit and of one evaluation edit: the fast path against the plain one.

    python -m benchmarks.step_speed                          # both models, 7 repeats, 2 threads
    python -m benchmarks.step_speed --models gpt2-shape --repeats 11 --out outputs/step_speed.json

The plain path is this code with every ``speed.*`` switch off (true gradients on every edit, one editor-MLP call per
edited weight, every pass through all blocks): the step as it was before those switches existed. Both paths run
alternately in one process on the same editor and batch (medians over ``--repeats``), so the machine's load affects
them alike and the ratio is the figure to compare. Peak memory comes from one fresh process per path.

Models:
- ``gpt2-shape``: GPT-2 with distilgpt2's shape (6 blocks, width 768), random weights, its config's edited weights
  (the MLPs of the last 3 blocks);
- ``smollm2``: the embedded SmolLM2-135M (30 blocks, the last 3 blocks' MLPs edited), as the main job.
Batch: one edit of 64 tokens (the last 10 are the target), its equivalence input of 64 tokens, one locality input of
128 tokens; MEND at the paper's rank 1920.

Also printed: the share of each part of the fast training step (torch.profiler, labels ``step/*`` in trainer.py),
and one edit against the work it cannot avoid, timed alone: a forward pass with a backward pass to the edited layers'
outputs, and the editor MLPs on the edited tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from algs.mend.editor import MEND
from config_schema import ModelConfig, SpeedConfig, compose_config, config_for
from data_classes.synthetic import SyntheticEdits
from models import edited_module_name, get_model
from models.inner_params import capture_calls
from trainer import EditTrainer
from utils import peak_memory_mb

SWITCHES = tuple(f.name for f in dataclasses.fields(SpeedConfig))  # every speed.* switch
PLAIN = dict.fromkeys(SWITCHES, False)
FAST = dict.fromkeys(SWITCHES, True)
MODELS = ("gpt2-shape", "smollm2")


def load(name: str):
    """(frozen model, run config) of a benchmark model."""
    if name == "gpt2-shape":
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=6, n_embd=768, n_head=12))
        model.eval().requires_grad_(False)
        inner = [f"transformer.h.{i}.mlp.{p}.weight" for i in (3, 4, 5) for p in ("c_fc", "c_proj")]
        model_cfg = ModelConfig(name="gpt2-shape", class_name="GPT2LMHeadModel", inner_params=inner)
        cfg = config_for(model_cfg, "gen", "mend", mend__rank=16)
        return model, cfg
    if name == "smollm2":
        cfg = compose_config(["+alg=mend", "+experiment=gen", "+model=smollm2", "wandb.enabled=false", "silent=true"])
        return get_model(cfg.model, os.path.expanduser(cfg.cache_dir)), cfg
    raise SystemExit(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}.")


def make_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def seq(n, target=0):
        ids = torch.randint(1, vocab, (1, n), generator=g)
        labels = torch.full_like(ids, -100)
        if target:
            labels[:, -target:] = ids[:, -target:]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    inner, outer, loc = seq(64, 10), seq(64, 10), seq(128)
    outer["input_ids"][:, -10:] = inner["input_ids"][:, -10:]
    outer["labels"] = outer["input_ids"].masked_fill(outer["labels"] == -100, -100)
    return {"edit_inner": inner, "edit_outer": outer, "loc": loc, "cond": inner}


def make_trainer(model, cfg, run_dir: str) -> EditTrainer:
    cfg.mend.rank = 1920
    cfg.accumulate_bs = 10**6  # no optimiser step: every repeat starts from the same editor
    cfg.log_interval = 10**6
    cfg.wandb.enabled, cfg.save, cfg.silent = False, False, True
    trainer = EditTrainer(lambda: MEND(model, cfg), cfg, SyntheticEdits(4), SyntheticEdits(4, seed=1), run_dir)
    trainer.editor.train()
    batch = make_batch(model.config.vocab_size, seed=1)
    for _ in range(2):  # normalisation statistics, as a trained editor has them
        trainer.editor.edit(batch["edit_inner"])
    return trainer


def set_path(trainer: EditTrainer, switches: dict) -> None:
    for key, value in switches.items():
        trainer.config.speed[key] = value


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def unavoidable(trainer: EditTrainer, batch: dict) -> dict:
    """The parts of an edit that any implementation does, timed alone: forward + backward to the edited layers'
    outputs, and the editor MLPs on the rows that carry gradient (no graph)."""
    editor = trainer.editor
    names = editor.inner_params
    modules = [edited_module_name(n) for n in names]
    leaves = {n: editor.current_weight(n).detach().requires_grad_(True) for n in names}
    start = time.perf_counter()
    with capture_calls(editor.model, modules) as factors:
        loss = editor.loss_with(batch["edit_inner"], leaves)["nll"]
    outputs = [o for m in modules for o in factors[m]["out"]]
    deltas = torch.autograd.grad(loss, outputs)
    forward_backward = time.perf_counter() - start
    rows = {
        n: (torch.cat([x.reshape(-1, x.shape[-1]) for x in factors[m]["x"]]), d.reshape(-1, d.shape[-1]))
        for n, m, d in zip(names, modules, deltas)
    }
    editor.eval()
    with torch.no_grad():
        start = time.perf_counter()
        editor._transform(rows)
        mlps = time.perf_counter() - start
    return {"forward_backward": forward_backward, "mlps": mlps}


def measure_times(name: str, repeats: int) -> dict:
    model, cfg = load(name)
    trainer = make_trainer(model, cfg, tempfile.mkdtemp())
    editor = trainer.editor
    batch = make_batch(model.config.vocab_size)

    def edit():  # outside the trainer, as python -m edit makes it; the plain path computed the true gradients there too
        editor.eval()
        editor.edit(batch["edit_inner"], diagnostics=not cfg.speed.grad_stats_on_log_steps)

    runs = {
        "train_step": lambda: trainer.edit_step(batch, training=True),
        "edit": edit,
        "eval_edit": lambda: trainer.edit_step(batch, training=False),
    }
    # the optimiser step after a training step (the demo schedules take one every step): plain and fused Adam
    params = [p for p in editor.outer_parameters() if all(p is not q for q in editor.step_size_parameters())]
    optimisers = {
        "plain": torch.optim.Adam(params, lr=cfg.mend.lr),
        "fast": torch.optim.Adam(params, lr=cfg.mend.lr, fused=True),
    }

    def optimiser_step(path):
        trainer.opt = optimisers[path]
        return timed(trainer._optimizer_step)

    times = {path: {k: [] for k in (*runs, "optimizer_step")} for path in ("plain", "fast")}
    parts = {"forward_backward": [], "mlps": []}
    for i in range(repeats + 1):  # the first round warms up
        for path, switches in (("plain", PLAIN), ("fast", FAST)):
            set_path(trainer, switches)
            for key, fn in runs.items():
                editor.zero_grad(set_to_none=True)
                t = timed(fn)
                if i:
                    times[path][key].append(t)
                if key == "train_step":  # its gradients are there: one optimiser step on them
                    t = optimiser_step(path)
                    if i:
                        times[path]["optimizer_step"].append(t)
        set_path(trainer, FAST)
        for key, value in unavoidable(trainer, batch).items():
            if i:
                parts[key].append(value)
    out = {path: {k: statistics.median(v) for k, v in d.items()} for path, d in times.items()}
    out["unavoidable"] = {k: statistics.median(v) for k, v in parts.items()}

    # the share of each labelled part of the fast training step
    set_path(trainer, FAST)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.edit_step(batch, training=True)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("step/")}
    whole = sum(totals.values())
    out["shares"] = {k: v / whole for k, v in sorted(totals.items())}
    return out


def measure_memory(name: str, path: str, steps: int = 3) -> dict:
    model, cfg = load(name)
    trainer = make_trainer(model, cfg, tempfile.mkdtemp())
    set_path(trainer, PLAIN if path == "plain" else FAST)
    batch = make_batch(model.config.vocab_size)
    for _ in range(steps):
        trainer.edit_step(batch, training=True)
    return peak_memory_mb()


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.worker == "times":
        return measure_times(args.model, args.repeats)
    return measure_memory(args.model, args.path)


def run_worker(*extra: str, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "benchmarks.step_speed", "--threads", str(threads), "--result", f.name, *extra]
        subprocess.run(cmd, check=True)
        return json.load(open(f.name))


def table(results: dict) -> str:
    lines = [
        "| model | part | plain (s) | fast (s) | plain / fast |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        parts = (
            ("train_step", "training step"),
            ("optimizer_step", "optimiser step"),
            ("edit", "one edit"),
            ("eval_edit", "evaluation edit"),
        )
        for key, label in parts:
            plain, fast = r["plain"][key], r["fast"][key]
            lines.append(f"| {name} | {label} | {plain:.3f} | {fast:.3f} | {plain / fast:.2f} |")
        plain, fast = (r[p]["train_step"] + r[p]["optimizer_step"] for p in ("plain", "fast"))
        lines.append(f"| {name} | training + optimiser step | {plain:.3f} | {fast:.3f} | {plain / fast:.2f} |")
        mem_plain, mem_fast = r["memory"]["plain"]["peak_rss_mb"], r["memory"]["fast"]["peak_rss_mb"]
        lines.append(f"| {name} | peak RSS (MB) | {mem_plain:.0f} | {mem_fast:.0f} | {mem_plain / mem_fast:.2f} |")
    lines += ["", "| model | one edit (s) | forward+backward (s) | editor MLPs (s) | edit / their sum |"]
    lines.append("|---|---|---|---|---|")
    for name, r in results.items():
        u = r["unavoidable"]
        total = u["forward_backward"] + u["mlps"]
        edit = r["fast"]["edit"]
        lines.append(f"| {name} | {edit:.3f} | {u['forward_backward']:.3f} | {u['mlps']:.3f} | {edit / total:.2f} |")
    lines += ["", "| model | " + " | ".join(k[5:] for k in next(iter(results.values()))["shares"]) + " |"]
    lines.append("|---" * (1 + len(next(iter(results.values()))["shares"])) + "|")
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.0%}" for v in r["shares"].values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--worker", choices=["times", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["plain", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        json.dump(worker(args), open(args.result, "w"))
        return
    results = {}
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; choose from {', '.join(MODELS)}.")
        r = run_worker("--worker", "times", "--model", name, "--repeats", str(args.repeats), threads=args.threads)
        r["memory"] = {
            path: run_worker("--worker", "memory", "--model", name, "--path", path, threads=args.threads)
            for path in ("plain", "fast")
        }
        results[name] = r
    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
