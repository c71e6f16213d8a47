"""The cost of one training meta-step of an editor on real CounterFact-format batches: its time and the process's
peak memory. MALMEN's point is that a meta-step of hundreds of edits fits in a few GB (docs/malmen.md).

    python -m benchmarks.malmen_step --alg malmen --n-edits 512          # one meta-step of 512 edits
    python -m benchmarks.malmen_step --alg mend --n-edits 1 --steps 5    # MEND's one-edit step, for the time per edit
    python -m benchmarks.malmen_step --alg malmen --n-edits 512 malmen.rank=960   # any run override after the flags

The run configuration is ``python -m run +alg=<alg> +experiment=counterfact +model=smollm2 data.facts=large`` with
``data.n_edits`` edits and as many locality prompts per batch, on the CPU. The base model, the data and the editor
are loaded first (the resident memory then is printed as ``loaded``); then ``--steps`` training steps run through
the trainer's own ``edit_step`` (the editor's ``meta_loss`` and ``meta_backward``, no optimiser step), each timed.
The peak is the process's peak resident set size (``resource.getrusage``), which includes the loading.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from config_schema import compose_config
from run import build
from trainer import EditTrainer
from utils import peak_memory_mb


def rss_mb() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alg", default="malmen")
    parser.add_argument("--n-edits", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="meta-steps to time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="run overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n_edits
    cfg = compose_config(
        [
            f"+alg={args.alg}",
            "+experiment=counterfact",
            "+model=smollm2",
            "data.facts=large",
            f"data.n_edits={n}",
            f"batch_size={2 * n}",
            f"val_batch_size={2 * n}",
            "device=cpu",
            "wandb.enabled=false",
            "silent=true",
            "accumulate_bs=1000000",  # no optimiser step: every step starts from the same editor
            *args.overrides,
        ]
    )
    model, _, datasets, make_editor = build(cfg)
    trainer = EditTrainer(make_editor, cfg, datasets[0], datasets[1], tempfile.mkdtemp())
    batches = datasets[0].edit_generator(cfg.batch_size)
    loaded = rss_mb()
    times, infos = [], []
    for _ in range(args.steps):
        batch = next(batches)
        start = time.perf_counter()
        infos.append(trainer.edit_step(batch, training=True))
        times.append(time.perf_counter() - start)
    out = {
        "alg": args.alg,
        "n_edits": n,
        "threads": args.threads,
        "loaded_rss_mb": round(loaded),
        **{k: round(v) for k, v in peak_memory_mb().items()},
        "step_seconds": [round(t, 2) for t in times],
        "seconds_per_edit": round(min(times) / n, 4),
        "loss/edit": [round(i["loss/edit"], 3) for i in infos],
        "edit/acc": [round(i["edit/acc"], 3) for i in infos],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
