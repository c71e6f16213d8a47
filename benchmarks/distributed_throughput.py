"""Training-step throughput of 1 and 2 processes (CPU, gloo), measured in one run, as a ratio.

    python -m benchmarks.distributed_throughput                  # the numbers in docs/scaling.md
    python -m benchmarks.distributed_throughput --repeats 5 --steps 12 --out outputs/bench/throughput.json

A small Llama (4 blocks, hidden 256, MLP 1024, vocab 4000; the last 3 blocks' MLPs edited, rank 1920) trains on
synthetic batches of 10 (5 edits, 5 locality passages of 32 tokens), one torch thread per process, with
``accumulate_bs=2``. Each repeat runs 1 process and then 2 processes (DDP) for ``--steps`` training batches after
one warm-up accumulation; the median time per batch of each gives edits per second and their ratio. On a machine
with fewer free cores than processes, the ratio measures the contention, not the method.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
import transformers

import distributed
from algs.mend.editor import MEND
from config_schema import ModelConfig, config_for
from data_classes.synthetic import SyntheticEdits
from trainer import EditTrainer


def _worker(rank, world, port, steps, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    inner = [f"model.layers.{i}.mlp.{w}.weight" for i in (1, 2, 3) for w in ("gate_proj", "up_proj", "down_proj")]
    model_cfg = ModelConfig(name="tiny-llama", class_name="LlamaForCausalLM", inner_params=inner, kind="causal_lm")
    cfg = config_for(
        model_cfg, "gen", "mend", **{"data.n_edits": 5, "batch_size": 10, "accumulate_bs": 2, "mend.rank": 1920}
    )
    distributed.init(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    mc = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=4000,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(mc).eval().requires_grad_(False)
    data = SyntheticEdits(200, n_edits=5, prompt_len=31)
    with tempfile.TemporaryDirectory() as run_dir:
        t = EditTrainer(lambda: MEND(model, cfg), cfg, data, data, run_dir)
        gen = t._train_steps()  # this rank's steps, as the trainer deals them out

        def one_step():
            before = distributed.stats_snapshot(t.editor)
            t.edit_step(next(gen), training=True)
            distributed.merge_running_stats(t.editor, before)
            t.state.step += world
            if t._crossed(cfg.accumulate_bs):
                t._optimizer_step()

        for _ in range(cfg.accumulate_bs // world):  # warm-up: one accumulation
            one_step()
        distributed.any_rank(False)  # start together
        start = time.perf_counter()
        for _ in range(steps // world):
            one_step()
        distributed.any_rank(False)
        elapsed = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": elapsed, "batches": steps // world * world}, f)
    distributed.shutdown()


def run_once(world: int, steps: int) -> float:
    """Seconds per training batch (of 10) with ``world`` processes."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_worker, args=(world, port, steps, f.name), nprocs=world, join=True)
        r = json.load(open(f.name))
    return r["seconds"] / r["batches"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="training batches timed per run (even)")
    parser.add_argument("--out", default="outputs/bench/distributed_throughput.json")
    args = parser.parse_args(argv)

    times = {1: [], 2: []}
    for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
        for world in (1, 2):
            times[world].append(run_once(world, args.steps))
    med = {w: statistics.median(v) for w, v in times.items()}
    row = {
        "s_per_batch_1": med[1],
        "s_per_batch_2": med[2],
        "edits_per_s_1": 5 / med[1],
        "edits_per_s_2": 5 / med[2],
        "speedup": med[1] / med[2],
        "cpus": os.cpu_count(),
        "all": times,
    }
    print(f"{'processes':>9} {'s / batch':>10} {'edits / s':>10}")
    for w in (1, 2):
        print(f"{w:>9} {med[w]:>10.3f} {5 / med[w]:>10.2f}")
    ratio = row["speedup"]
    print(f"throughput ratio (2 processes / 1): {ratio:.2f}  (median of {args.repeats}, {os.cpu_count()} CPUs)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(row, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
