"""Estimated memory per device of editor training for the large model configs, without downloading them.

    python -m benchmarks.memory_estimate                         # the table in docs/scaling.md: batch 10, fp32 and bf16
    python -m benchmarks.memory_estimate --models llama3-8b --dtypes bfloat16 --world-size 8 --overrides mend.rank=480

Each model is built on the meta device from ``model.arch`` in its YAML (no weights, no memory); the estimate is
memory.estimate: base weights, the editor with its gradients and Adam state, the edited weights, activations of the
blocks from the lowest edited one upward, logits. Batch 10 = ``data.n_edits=5 batch_size=10``: 5 edits and 5
locality passages of ``--seq-len`` tokens (74: the gen experiment's 64-token passages and 10-token targets).
"""

from __future__ import annotations

import argparse

from config_schema import compose_config
from memory import estimate

LARGE = ["llama2-7b", "llama3-8b", "qwen2.5-7b", "mistral-7b", "gemma2-2b"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=LARGE)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--world-size", type=int, default=1, help="processes (adds DDP's gradient buckets when > 1)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--overrides", nargs="*", default=["data.n_edits=5", "batch_size=10", "val_batch_size=10"])
    args = parser.parse_args(argv)

    gib = 2**30
    print(
        f"{'model':<12} {'dtype':<9} {'weights':>8} {'editor+grad+Adam':>17} {'edited W':>9} {'activations':>12} "
        f"{'total (GiB)':>12}"
    )
    for name in args.models:
        for dtype in args.dtypes:
            overrides = ["+alg=mend", "+experiment=gen", f"+model={name}", f"model.dtype={dtype}", *args.overrides]
            cfg = compose_config(overrides)
            p = estimate(cfg, world_size=args.world_size, seq_len=args.seq_len)
            editor = p["editor"] + p["editor gradients"] + p["optimizer state (Adam)"]
            editor += p.get("DDP gradient buckets", 0)
            acts = p["editor activations"] + p["block activations"] + p["logits"]
            print(
                f"{name:<12} {dtype:<9} {p['base model weights'] / gib:>8.1f} {editor / gib:>17.1f} "
                f"{p['edited weights'] / gib:>9.1f} {acts / gib:>12.1f} {p['total'] / gib:>12.1f}"
            )


if __name__ == "__main__":
    main()
