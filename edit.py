"""Use a trained editor (any editor of ``algs``): edit requests in, an edited model out.

From Python::

    from edit import Editor, EditRequest
    editor = Editor.from_archive("outputs/<run>")          # the training run (or its checkpoints/best.pt)
    result = editor.apply([EditRequest("The capital of Australia is", "Sydney",
                                       rephrases=["Australia's capital city is"],
                                       watch=["The capital of France is"])], mode="batched")
    print(result.table())                                    # before/after figures per request
    result.save_pretrained("edited-model")                   # loads with AutoModelForCausalLM.from_pretrained
    result.save_patches("patches")                           # one compact patch per applied edit
    editor.save_peft_adapter(result.model, "adapter")        # the same edit as a PEFT LoRA adapter
    editor.save_pretrained("my-editor")                      # the editor itself, small; Editor.from_pretrained
    model = result.model                                     # an EditedModel: base + a stack of patches
    model.revert()                                           # drop the last patch: the weights before it, bit for bit

From the shell (no Hydra: the configuration comes from the checkpoint)::

    python -m edit apply --archive outputs/<run> --requests requests.jsonl --out edited-model/ \
        [--mode batched|sequential] [--patch-out patches/] [--patch patches/ ...] [--peft-out adapter/] [--overwrite]
    python -m edit push --archive outputs/<run>|<saved editor> --repo <user>/<name> [--private] [--token T]
    python -m edit eval-sequential --archive outputs/<run> --n 100 --checkpoints 1,10,100 [--plot seq.png]
    python -m edit eval --archive outputs/<run> [--path counterfact.json] --n 200 --mode single|batched|sequential \
        [--n-edits 1,10,100] [--generation] [--out eval/ [--layout run|rome]] [--plot curve.png]

A request file has one JSON object per line:
``{"prompt": "...", "target": "...", "rephrases": ["..."], "watch": ["..."]}`` (rephrases and watch optional).

Semantics:

* ``batched``: all requests in one update (their pseudo-gradients summed, as in training with data.n_edits > 1).
* ``sequential``: one request after another, each edit computed on the model already edited by the previous ones.

Either way each update is kept as a :class:`patches.Patch`: for an editor whose update is low-rank, per edited weight
the factors u~ (N x d_in), v~ (N x d_out) and the step size alpha, with W~ = W - alpha * (v~^T u~) for nn.Linear
(u~^T v~ for GPT-2's Conv1D); for one whose update has no low-rank form, the dense difference W - W~. The base model
is never written to: an :class:`patches.EditedModel` is the base model plus a stack of patches, and reverting a patch
recomputes the weights from the untouched base and the remaining patches. The pieces live in their own modules:
requests in ``data_classes/requests.py``, patches and the stack in ``patches.py``, the sequential experiment in
``sequential.py``, the field's metrics on CounterFact-format cases, the pipeline of ``python -m edit eval`` and the
EasyEdit-shaped :meth:`Editor.edit` in ``fact_eval.py``, the :class:`Editor` and its public surface in
``editing.py``; this module is the command line and re-exports the Python API.

Every output path and the device are checked before anything loads: an output's directory must exist, and no file
is replaced without ``--overwrite``. Progress bars (on a terminal) and a line on what is about to be built or sampled
go to stderr; ``--quiet`` turns both off.

Exit status of the command line: 0 done; 2 a clear error (bad request file, checkpoint or model that do not fit,
output that exists or has no directory, device not on this machine), printed as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from typing import List, Optional

from data_classes.requests import EditRequest, load_requests
from editing import Editor, EditResult, format_table
from editor_io import push
from errors import EditRequestError, OutputExistsError, PatchError, UserError
from eval_progress import SAVE_SECONDS, EvaluationStopped
from fact_eval import MODES, evaluate_dataset, output_files, progress_files
from fact_report import LAYOUTS, run_name
from patches import EditedModel, Patch, load_patches
from preflight import MAX_PROMPT_TOKENS, check_device, check_output_dir, check_output_file
from progress import ProgressBars
from signals import graceful_stop
from utils import atomic_write_text

# The Python API (names defined in the modules above are re-exported here, where users import them from).
__all__ = [
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "EditedModel",
    "Editor",
    "Patch",
    "PatchError",
    "format_table",
    "load_patches",
    "load_requests",
    "main",
]


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    description = "Edit a model with a trained editor (any editor of algs/)."
    p = argparse.ArgumentParser(prog="python -m edit", description=description)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s):
        s.add_argument("--archive", required=True, help="training run directory or checkpoint file")
        s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto (default: cpu)")
        s.add_argument("--model-name", help="load the base model from here instead (e.g. a moved directory)")
        s.add_argument("--cache-dir", help="cache of embedded models and data (default: the run's cache_dir)")
        s.add_argument("-v", "--verbose", action="store_true", help="log progress")
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no status lines")
        s.add_argument("--overwrite", action="store_true", help="allow replacing existing outputs")

    a = sub.add_parser("apply", help="apply edit requests and/or saved patches; print a before/after table")
    common(a)
    a.add_argument("--requests", help="JSONL file of requests: {prompt, target, rephrases?, watch?} per line")
    a.add_argument("--mode", choices=("batched", "sequential"), default="batched")
    a.add_argument("--patch", action="append", default=[], help="saved patch file or directory, applied first")
    a.add_argument("--out", help="write the edited model here (loads with from_pretrained)")
    a.add_argument("--peft-out", help="write the applied patches as a PEFT LoRA adapter of the base model here")
    a.add_argument("--patch-out", help="add the new patches to this directory (patch-0000.safetensors, ...)")
    a.add_argument("--report", help="write the per-request figures as JSON here")
    a.add_argument("--watch-tokens", type=int, default=8, help="greedy tokens generated for watched prompts")
    a.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"warn about longer prompts (default {MAX_PROMPT_TOKENS}); longer than the model's context is an error",
    )

    s = sub.add_parser(
        "eval-sequential", help="sequential edits from the validation data of the editor's task: retention, drawdown"
    )
    common(s)
    s.add_argument("--n", type=int, default=100, help="number of sequential edits")
    s.add_argument("--checkpoints", default="1,10,100", help="comma-separated edit counts to evaluate at")
    s.add_argument("--n-loc", type=int, default=20, help="locality passages for the perplexity drawdown")
    s.add_argument("--plot", default="sequential-edits.png", help="PNG written here")
    s.add_argument("--report", help="write the figures as JSON here")

    u = sub.add_parser("push", help="upload an editor (a training run or a saved editor) to the HuggingFace hub")
    u.add_argument("--archive", required=True, help="training run directory, checkpoint file or saved editor")
    u.add_argument("--repo", required=True, help="the hub repository, <owner>/<name> (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--token", help="HuggingFace token (default: HF_TOKEN or the one of huggingface-cli login)")
    u.add_argument("--message", default="", help="the commit message")
    u.add_argument("-v", "--verbose", action="store_true", help="log progress")

    e = sub.add_parser("eval", help="the field's metrics on fact edits: CounterFact's scores, EasyEdit's accuracies")
    common(e)
    e.add_argument("--data", choices=("counterfact",), default="counterfact", help="the cases' format")
    e.add_argument("--path", help="counterfact.json, a JSONL file or hf:<dataset id> (default: the embedded set)")
    e.add_argument(
        "--split", choices=("validation", "train", "all"), default="validation", help="all: validation, then train"
    )
    e.add_argument("--n", type=int, default=200, help="evaluate the first N cases")
    e.add_argument("--mode", default="single", help="single, batched, sequential, or several (batched,sequential)")
    e.add_argument("--n-edits", default="1", help="batched / sequential: comma-separated group sizes (1,10,100)")
    e.add_argument(
        "--edits-per-step", type=int, default=1, help="sequential: edits per update (100: 10,000 edits in 100 updates)"
    )
    e.add_argument(
        "--cases-per-size",
        type=int,
        help="evaluate max(N, this) cases at group size N instead of all --n (a curve up to 10,000 without 10,000 "
        "single edits)",
    )
    e.add_argument("--paraphrases", type=int, help="score at most this many paraphrase prompts per case (default: all)")
    e.add_argument("--neighbors", type=int, help="score at most this many neighbourhood prompts a case (default: all)")
    e.add_argument("--generation", action="store_true", help="also fluency and consistency (greedy continuations)")
    e.add_argument("--gen-tokens", type=int, default=50, help="tokens generated per generation prompt")
    e.add_argument("--out", help="directory for one JSON per run (cases in pre/post layout) and summary.md")
    e.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="run",
        help="--out's files: run (one JSON per run) or rome (a directory per run of ROME's case_<id>.json files, "
        "which ROME's experiments/summarize.py reads)",
    )
    e.add_argument("--plot", help="PNG of the scores against the group size")
    e.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs an interrupted command left in --out (from their progress files) and keep the "
        "finished ones",
    )
    e.add_argument(
        "--save-minutes",
        type=float,
        default=SAVE_SECONDS / 60,
        help=f"with --out: write a run's progress there this often, for --resume (default {SAVE_SECONDS / 60:g})",
    )
    e.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=MAX_PROMPT_TOKENS,
        help=f"warn about cases with longer prompts (default {MAX_PROMPT_TOKENS})",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    quiet = getattr(args, "quiet", False)
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if getattr(args, "device", None):
            check_device(args.device)  # before anything loads, as the outputs are (in each command)
        if args.command == "apply":
            return _cmd_apply(args, say)
        if args.command == "eval":
            return _cmd_eval(args, say)
        if args.command == "push":
            return _cmd_push(args)
        return _cmd_eval_sequential(args, say)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_apply(args, say) -> int:
    if not args.requests and not args.patch:
        raise EditRequestError("nothing to apply: give --requests FILE and/or --patch PATH.")
    if args.max_prompt_tokens < 1:
        raise EditRequestError("--max-prompt-tokens must be positive.")
    # every output is checked before anything loads (the edit's work is not lost to a missing directory)
    check_output_file(args.report, "--report", args.overwrite)
    check_output_dir(args.out, "--out", args.overwrite)
    check_output_dir(args.patch_out, "--patch-out", args.overwrite, writes=())  # numbered after the ones there
    check_output_dir(args.peft_out, "--peft-out", args.overwrite)
    requests = load_requests(args.requests) if args.requests else []  # a bad file fails before any loading
    patches = load_patches(args.patch) if args.patch else []
    say(f"loading the editor {args.archive} and its base model")
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    model = editor.apply_patches(patches) if patches else None
    if patches:
        print(f"applied {len(patches)} saved patch(es) from {', '.join(args.patch)}")
    result = None
    if requests:
        bars = ProgressBars(disable=True if args.quiet else None)
        try:
            result = editor.apply(
                requests,
                mode=args.mode,
                on=model,
                watch_tokens=args.watch_tokens,
                progress=bars,
                max_prompt_tokens=args.max_prompt_tokens,
            )
        finally:
            bars.close()
        model = result.model
        print(result.table())
        if args.patch_out:
            files = result.save_patches(args.patch_out)
            print(f"wrote {len(files)} patch(es) to {args.patch_out}")
        if args.report:
            text = json.dumps({"mode": result.mode, "requests": result.report}, indent=1, ensure_ascii=False)
            atomic_write_text(text + "\n", os.path.expanduser(args.report))
    if args.out:
        info = {"report": result.report} if result is not None else {}
        model.save_pretrained(args.out, editor.tokenizer, args.overwrite, info=info)
        print(f"wrote the edited model ({len(model.patches)} patch(es)) to {args.out}")
    if args.peft_out:
        editor.save_peft_adapter(model, args.peft_out, args.overwrite)
        print(f"wrote the edit ({len(model.patches)} patch(es)) as a PEFT LoRA adapter to {args.peft_out}")
    return 0


def _cmd_push(args) -> int:
    url = push(args.archive, args.repo, token=args.token, private=args.private, message=args.message)
    print(f"uploaded {args.archive} to {url}")
    return 0


def _cmd_eval_sequential(args, say) -> int:
    try:
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c.strip()]
    except ValueError:
        raise EditRequestError(f"--checkpoints {args.checkpoints!r}: expected comma-separated integers.") from None
    if args.n < 1 or args.n_loc < 1:
        raise EditRequestError("--n and --n-loc must be positive.")
    check_output_file(args.plot, "--plot", args.overwrite)
    check_output_file(args.report, "--report", args.overwrite)
    say(f"loading the editor {args.archive} and its base model")
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    bars = ProgressBars(disable=True if args.quiet else None)
    try:
        result = editor.eval_sequential(
            n=args.n,
            checkpoints=checkpoints,
            plot=args.plot,
            n_loc=args.n_loc,
            cache_dir=args.cache_dir,
            progress=bars,
            say=say,
        )
    finally:
        bars.close()
    head = (
        f"{'edits':>6}  {'still hold':>10}  {'on rephrasing':>13}  {'held when applied':>17}  "
        f"{'ppl pre':>8}  {'ppl post':>8}  {'drawdown':>8}"
    )
    print(head)
    for r in result["checkpoints"]:
        print(
            f"{r['n_edits']:>6}  {r['held']:>4}/{r['n_edits']:<5}  {r['held_rephrase_frac']:>13.2f}  "
            f"{r['success_when_applied_frac']:>17.2f}  {r['perplexity_pre']:>8.3f}  {r['perplexity_post']:>8.3f}  "
            f"{r['drawdown']:>8.3f}"
        )
    if args.report:
        atomic_write_text(json.dumps(result, indent=1) + "\n", os.path.expanduser(args.report))
    if result.get("plot"):
        print(f"plot: {result['plot']}")
    return 0


def _cmd_eval(args, say) -> int:
    try:
        sizes = [int(c) for c in args.n_edits.split(",") if c.strip()]
    except ValueError:
        raise EditRequestError(f"--n-edits {args.n_edits!r}: expected comma-separated integers.") from None
    if not sizes or min(sizes) < 1 or args.n < 1 or args.edits_per_step < 1 or (args.cases_per_size or 1) < 1:
        raise EditRequestError("--n, --n-edits, --edits-per-step and --cases-per-size must be positive.")
    if any(v is not None and v < 1 for v in (args.paraphrases, args.neighbors)):
        raise EditRequestError("--paraphrases and --neighbors must be positive (leave them out to score all prompts).")
    if args.layout != "run" and not args.out:
        raise EditRequestError(f"--layout {args.layout} says how --out's files are laid out: give --out DIR too.")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EditRequestError(f"--mode {args.mode!r}: choose from {', '.join(MODES)} (comma-separated for several).")
    plan = [(m, size) for m in modes for size in ([1] if m == "single" else sizes)]
    if max(sizes) > args.n and any(m != "single" for m in modes):
        raise EditRequestError(f"--n-edits {max(sizes)} needs at least as many cases: give --n {max(sizes)} or more.")
    if args.max_prompt_tokens < 1:
        raise EditRequestError("--max-prompt-tokens must be positive.")
    if args.save_minutes <= 0:
        raise EditRequestError("--save-minutes must be positive.")
    if args.resume and not args.out:
        raise EditRequestError("--resume continues the runs saved in --out: give --out DIR too.")
    if args.resume and args.layout != "run":
        raise EditRequestError("--resume reads the finished runs' JSON files: it needs --layout run.")
    if args.resume and args.overwrite:
        raise EditRequestError("--resume keeps what --out holds and --overwrite replaces it: give one of them.")
    if args.out and not args.resume:
        unfinished = [f for f in progress_files(plan, args.edits_per_step) if os.path.exists(os.path.join(args.out, f))]
        if unfinished and not args.overwrite:
            raise OutputExistsError(
                f"--out {args.out}: holds the progress of an interrupted run ({unfinished[0]}); pass --resume to "
                "continue it, or --overwrite to start again."
            )
    writes = output_files(plan, args.edits_per_step, args.layout)
    check_output_dir(args.out, "--out", args.overwrite or args.resume, writes=writes)  # --resume keeps what is there
    check_output_file(args.plot, "--plot", args.overwrite or args.resume)
    say(f"loading the editor {args.archive} and its base model")
    editor = Editor.from_archive(args.archive, args.device, args.cache_dir, args.model_name)
    bars = ProgressBars(disable=True if args.quiet else None)
    asked = []

    def ask_to_stop(signum):
        asked.append(signum)
        say("eval: stopping after the current update, its progress saved for --resume (again: stop at once)")

    stop = graceful_stop(ask_to_stop, lambda: bool(asked)) if args.out else contextlib.nullcontext()
    try:
        with stop:
            result = evaluate_dataset(
                editor,
                plan,
                path=args.path,
                split=args.split,
                n=args.n,
                generation=args.generation,
                gen_tokens=args.gen_tokens,
                out_dir=args.out,
                plot=args.plot,
                cache_dir=args.cache_dir,
                edits_per_step=args.edits_per_step,
                cases_per_size=args.cases_per_size,
                progress=bars,
                paraphrases=args.paraphrases,
                neighbors=args.neighbors,
                layout=args.layout,
                say=say,
                max_prompt_tokens=args.max_prompt_tokens,
                resume=args.resume,
                save_seconds=args.save_minutes * 60,
                should_stop=lambda: bool(asked),
            )
    except EvaluationStopped as stopped:
        print(f"{stopped}; run the same command with --resume to continue.", file=sys.stderr)
        return 128 + int(asked[0] if asked else signal.SIGINT)  # as a stopped training run exits
    finally:
        bars.close()
    print(f"{result['n_cases']} cases ({args.data}, {args.path or 'embedded'}, {args.split}); scores in percent")
    print(result["table"])
    for line in result["warnings"]:
        print(f"warning: {line}")
    print(f"the unedited model: {result['prepare_seconds']:.0f} s")
    for run in result["runs"]:
        s = run["summary"]
        times = f"edits {s['edit_seconds']:.0f} s, scoring {s['eval_seconds']:.0f} s"
        print(f"{run_name(run)}: {times} ({s['n_cases']} cases)")
    if result["plot"]:
        print(f"plot: {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
