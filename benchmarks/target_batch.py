"""Time of the target vectors of MEMIT, AlphaEdit (and ROME): full passes one request at a time (as the originals
run them) against passes on the prompts' prefix cache (the default), one request at a time and ``target_batch``
requests to a pass, on the same requests in one process.

    python -m run +alg=memit +experiment=counterfact +model=smollm2 data.facts=large hydra.run.dir=outputs/loc/big_memit
    python -m benchmarks.target_batch --archive outputs/loc/big_memit --n 8 --batch 8 --repeats 3

The requests are the first ``--n`` held-out cases of the archive's fact set. Each repeat times ``optimise_targets``
over the requests in every configuration in turn (so machine load affects them alike); the figures are medians.
Also reported: the largest difference between each configuration's vectors and those of full passes one at a time
(float rounding only), and whether every request took the same steps.
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


def vectors(alg, requests: List[LocateRequest], size: int, prefix: bool):
    contexts = [t for group in alg.context_templates() for t in group]
    block = alg.layers[-1].block
    out, steps = [], []
    for at in range(0, len(requests), size):
        z, taken = optimise_targets(
            alg.model, dict(alg.weights), alg.tokenizer, requests[at : at + size], contexts, block, alg.settings, prefix
        )
        out.append(z)
        steps += taken
    return torch.cat(out), steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archive",
        required=True,
        help="a python -m run directory of alg=memit, alphaedit or rome (ROME edits one request at a time: its"
        " batched rows are not a setting it offers)",
    )
    parser.add_argument("--n", type=int, default=16, help="held-out requests")
    parser.add_argument("--batch", default="8", help="comma-separated target_batch sizes to time (prefix cache)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    configs = [(1, False), (1, True)] + [(int(size), True) for size in args.batch.split(",") if size]
    editor = Editor.from_archive(args.archive)
    alg = editor.alg
    requests = requests_of(editor, args.n)
    alg.context_templates()  # sampled once, before the clock
    times = {c: [] for c in configs}
    results = {}
    for _ in range(args.repeats):
        for c in configs:
            start = time.perf_counter()
            results[c] = vectors(alg, requests, *c)
            times[c].append(time.perf_counter() - start)
    reference = configs[0]
    plain = statistics.median(times[reference])
    report = {"archive": args.archive, "requests": len(requests), "repeats": args.repeats}
    report["threads"] = torch.get_num_threads()
    report["steps"] = results[reference][1]
    report["configs"] = []
    for c in configs:
        median = statistics.median(times[c])
        diff = (results[c][0] - results[reference][0]).abs().max().item()
        same = results[c][1] == results[reference][1]
        name = f"target_batch={c[0]}, " + ("prefix cache" if c[1] else "full passes")
        report["configs"].append({"config": name, "seconds": median, "per_request": median / len(requests),
                                  "speedup": plain / median, "max_diff": diff, "same_steps": same})  # fmt: skip
        print(
            f"{name}: {median:.1f} s for {len(requests)} requests ({median / len(requests):.2f} s each), "
            f"{plain / median:.2f}x full passes one at a time; largest difference {diff:.1e}, same steps: {same}"
        )
    print(f"steps per request: {report['steps']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
