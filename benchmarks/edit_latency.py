"""Latency of one MEND edit against one plain forward+backward of the base model, on the same batch.

    python -m benchmarks.edit_latency                       # embedded SmolLM2-135M, 1 and 5 edits
    python -m benchmarks.edit_latency --archive outputs/<run> --repeats 20 --out bench.json
    python -m benchmarks.edit_latency --overrides +model=distilgpt2 device=cuda

The reference is what one fine-tuning step costs before the optimiser: a forward pass and
``loss.backward()`` with the edited weights requiring gradients. MEND's edit adds the hooks, the
gradient transform and the weight update to that. Both are timed alternately in one process
(medians over ``--repeats``), so machine load affects them alike; the ratio is the figure to compare.
Also reported: the median time of one full training step (edit, post-edit losses, backward into
the editor) and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from config_schema import compose_config
from losses import masked_log_probs
from run import build
from trainer import EditTrainer
from utils import model_inputs, peak_memory_mb, to_device


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(n_edits: int, args) -> dict:
    overrides = [
        "+alg=mend",
        "+experiment=gen",
        *args.overrides,
        f"data.n_edits={n_edits}",
        f"batch_size={n_edits + 1}",
        f"val_batch_size={n_edits + 1}",
        "wandb.enabled=false",
        "silent=true",
        "accumulate_bs=1000000",
    ]
    if args.archive:
        overrides.append(f"archive={args.archive}")
    cfg = compose_config(overrides)
    model, _, sets, make_editor = build(cfg)
    device = next(model.parameters()).device
    trainer = EditTrainer(make_editor, cfg, sets[0], sets[1], "/tmp/mend-bench")
    editor = trainer.editor
    train_batches = sets[0].edit_generator(cfg.batch_size)
    if not args.archive:  # normalisation statistics from a few training edits, as training would gather
        editor.train()
        for _ in range(3):
            editor.edit(to_device(next(train_batches)["edit_inner"], device))
    editor.eval()
    batch = to_device(next(sets[1].edit_generator(cfg.val_batch_size, n=1)), device)
    edit_batch = batch["edit_inner"]
    names = list(cfg.model.inner_params)

    def reference():
        params = [model.get_parameter(n) for n in names]
        for p in params:
            p.requires_grad_(True)
        logits = model(**model_inputs(edit_batch)).logits
        masked_log_probs(logits, edit_batch["labels"])["nll"].backward()
        for p in params:
            p.grad = None
            p.requires_grad_(False)

    def mend_edit():
        editor.edit(edit_batch)

    for fn in (reference, mend_edit):  # warm-up
        fn()
    ref_times, edit_times = [], []
    for _ in range(args.repeats):  # interleaved so that load changes hit both alike
        ref_times.append(timed(reference, 1))
        edit_times.append(timed(mend_edit, 1))
    ref, edit = statistics.median(ref_times), statistics.median(edit_times)
    step = timed(lambda: trainer.edit_step(next(train_batches), training=True), max(3, args.repeats // 2))
    tokens = int(edit_batch["attention_mask"].sum())
    return {
        "n_edits": n_edits,
        "edit_tokens": tokens,
        "forward_backward_s": ref,
        "mend_edit_s": edit,
        "ratio": edit / ref,
        "train_step_s": step,
        "peak_rss_mb": peak_memory_mb()["peak_rss_mb"],
        "model": cfg.model.name,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--archive", default=None, help="trained editor (checkpoint or run directory)")
    parser.add_argument("--out", default="outputs/bench/edit_latency.json")
    parser.add_argument("--overrides", nargs="*", default=["+model=smollm2"])
    args = parser.parse_args(argv)

    rows = [measure(n_edits, args) for n_edits in args.n_edits]

    header = (
        f"{'edits':>5} {'tokens':>6} {'fwd+bwd (s)':>12} {'MEND edit (s)':>14} {'ratio':>6} "
        f"{'train step (s)':>15} {'peak RSS (MB)':>14}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['n_edits']:>5} {r['edit_tokens']:>6} {r['forward_backward_s']:>12.3f} {r['mend_edit_s']:>14.3f} "
            f"{r['ratio']:>6.2f} {r['train_step_s']:>15.3f} {r['peak_rss_mb']:>14.0f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
