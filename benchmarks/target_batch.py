"""Time of MEMIT's and AlphaEdit's target vectors, one request at a time (the originals) against ``target_batch``
requests to a pass, on the same requests in one process.

    python -m run +alg=memit +experiment=counterfact +model=smollm2 data.facts=large hydra.run.dir=outputs/loc/big_memit
    python -m benchmarks.target_batch --archive outputs/loc/big_memit --n 16 --batch 4,16 --repeats 3

The requests are the first ``--n`` held-out cases of the archive's fact set. Each repeat times the loop of
``optimise_targets`` over single requests, then over chunks of each ``--batch`` size (alternating, so machine load
affects them alike); the figures are medians. Also reported: the largest difference between the vectors of a
batched pass and those of the single ones (float rounding only: each request is optimised as alone), and the
steps the requests took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import List

import torch

from algs.locate.text import LocateRequest
from algs.locate.vectors import optimise_targets
from data_classes.counterfact import load_split
from editing import Editor


def requests_of(editor: Editor, n: int) -> List[LocateRequest]:
    cfg = editor.config
    records, _ = load_split(cfg.data, "validation", int(cfg.seed), cfg.cache_dir)
    out = []
    for record in records[:n]:
        prompt, subject = record["prompt"], record["subject"]
        out.append(LocateRequest.of(prompt.format(subject), subject, record["target_new"]))
    return out


def vectors(alg, requests: List[LocateRequest], size: int):
    contexts = [t for group in alg.context_templates() for t in group]
    block = alg.layers[-1].block
    out, steps = [], []
    for at in range(0, len(requests), size):
        z, taken = optimise_targets(
            alg.model, dict(alg.weights), alg.tokenizer, requests[at : at + size], contexts, block, alg.settings
        )
        out.append(z)
        steps += taken
    return torch.cat(out), steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", required=True, help="a python -m run directory of alg=memit or alphaedit")
    parser.add_argument("--n", type=int, default=16, help="held-out requests")
    parser.add_argument("--batch", default="4,16", help="comma-separated target_batch sizes to time against 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch.split(",")]
    editor = Editor.from_archive(args.archive)
    alg = editor.alg
    requests = requests_of(editor, args.n)
    alg.context_templates()  # sampled once, before the clock
    times = {size: [] for size in [1] + sizes}
    results = {}
    for _ in range(args.repeats):
        for size in [1] + sizes:
            start = time.perf_counter()
            results[size] = vectors(alg, requests, size)
            times[size].append(time.perf_counter() - start)
    single = statistics.median(times[1])
    report = {
        "archive": args.archive,
        "requests": len(requests),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    report["steps"] = results[1][1]
    report["sizes"] = {}
    for size in [1] + sizes:
        median = statistics.median(times[size])
        diff = (results[size][0] - results[1][0]).abs().max().item()
        report["sizes"][size] = {"seconds": median, "per_request": median / len(requests), "speedup": single / median,
                                 "max_diff": diff, "same_steps": results[size][1] == results[1][1]}  # fmt: skip
        print(
            f"target_batch={size}: {median:.1f} s for {len(requests)} requests ({median / len(requests):.2f} s each), "
            f"{single / median:.2f}x the one-at-a-time loop; largest difference {diff:.1e}, "
            f"same steps: {results[size][1] == results[1][1]}"
        )
    print(f"steps per request: {report['steps']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
