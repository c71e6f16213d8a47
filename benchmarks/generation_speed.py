"""Greedy generation one prompt at a time against left-padded batches (``EditedModel.greedy_batch``), on the same
prompts: the generation prompts of CounterFact-format cases, as ``python -m edit eval --generation`` runs them.

    python -m benchmarks.generation_speed --archive outputs/cf2_mend            # 3 cases, 50 tokens, 3 repeats
    python -m benchmarks.generation_speed --archive outputs/cf2_mend --cases 8 --tokens 20 --out gen_speed.json

Three ways, timed alternately in one process (medians over ``--repeats``, so machine load affects them alike):
``one_at_a_time`` (each prompt alone), ``per_case`` (a case's prompts in one batch, as single-mode edits run after
each edit) and ``all_cases`` (every prompt in one batch, as the pass over the unedited model runs). The tokens of
the three are compared too: a batch must give each prompt the tokens it gets alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from data_classes.counterfact import load_split
from edit import Editor


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="a trained counterfact run (outputs/<run>)")
    ap.add_argument("--path", default=None, help="CounterFact-format cases (default: the run's own data)")
    ap.add_argument("--split", choices=("validation", "train", "all"), default="validation")
    ap.add_argument("--cases", type=int, default=3, help="held-out cases whose generation prompts are used")
    ap.add_argument("--tokens", type=int, default=50, help="tokens generated per prompt (edit eval's --gen-tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    editor = Editor.from_archive(args.archive)
    cfg = editor.config
    data_cfg = cfg.data.copy()
    if args.path:
        data_cfg.path = args.path
    splits = ("train", "validation") if args.split == "all" else (args.split,)
    cache_dir = os.path.expanduser(cfg.cache_dir)
    cases = [c for split in splits for c in load_split(data_cfg, split, cfg.seed, cache_dir)[0]][: args.cases]
    groups = [[editor.encode(p) for p in c["generation_prompts"]] for c in cases]
    flat = [p for g in groups for p in g]
    model = editor.base()

    ways = {
        "one_at_a_time": lambda: [editor.greedy(model, p, args.tokens) for p in flat],
        "per_case": lambda: [t for g in groups for t in editor.greedy_many(model, g, args.tokens)],
        "all_cases": lambda: editor.greedy_many(model, flat, args.tokens, chunk=len(flat)),
    }
    times = {k: [] for k in ways}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "archive": args.archive,
        "prompts": len(flat),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "seconds": medians,
        "speedup_vs_one_at_a_time": {k: medians["one_at_a_time"] / v for k, v in medians.items()},
        "same_tokens": {k: tokens[k] == tokens["one_at_a_time"] for k in ways},
    }
    print(f"{len(flat)} prompts x {args.tokens} tokens, median of {args.repeats} ({result['threads']} threads)")
    for k in ways:
        print(
            f"  {k:<14} {medians[k]:7.2f} s   x{result['speedup_vs_one_at_a_time'][k]:.2f}   "
            f"same tokens: {result['same_tokens'][k]}"
        )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
