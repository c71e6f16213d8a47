"""Editor training on several processes (CPU, gloo, 2 processes): the same gradient and editor as one process
(MEND; MALMEN and RLEdit, whose staged backward hands DDP a surrogate loss), rank 0 alone writing, and the
torchrun command lines of docs/scaling.md (scaled down) end to end, MALMEN's and RLEdit's among them.

In-process tests start 2 workers with torch.multiprocessing on a tiny Llama and the synthetic edit set; the
command-line tests run ``torchrun`` (as ``python -m torch.distributed.run``) on the tiny GPT-2 of test_run.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, SyntheticEdits, make_config
from test_run import ROOT, workspace  # noqa: F401  (workspace is a fixture)
from test_run import cli_command as cli

import checkpoints
import distributed
import evaluation
import utils
from algs import editor_class
from errors import TrainingInterrupted
from trainer import EditTrainer

TRAIN = dict(
    mend__lr=1e-3,
    mend__lr_lr=1e-2,
    mend__edit_lr=1e-3,
    accumulate_bs=2,
    max_iters=8,
    val_interval=4,
    val_steps=3,  # not a multiple of 2: ranks evaluate 2 and 1 batches
    log_interval=2,
    **{"eval.compare_untrained": True, "eval.final_steps": 3},
)
# MALMEN and RLEdit at the tiny settings of tests/test_malmen.py and tests/test_rledit.py, two batches (RLEdit: two
# sequences of two batches) per optimiser step.
STAGED = {
    "data.n_edits": 3,
    "batch_size": 6,
    "val_batch_size": 6,
    "accumulate_bs": 2,
    "cedit": 1.0,
    "max_iters": 4,
    "val_interval": 100,
    "val_steps": 2,
    "log_interval": 1,
    "eval.compare_untrained": False,
}
SETTINGS = {
    "mend": TRAIN,
    "malmen": {**STAGED, "malmen.rank": 4, "malmen.chunk_size": 2, "malmen.edit_lr": 1e-3, "grad_clip": 1.0},
    # grad_clip 1 clips every sequence's gradient here (the mean of two unclipped ones has a norm near 28)
    "rledit": {
        **STAGED,
        **{"rledit.rank": 4, "rledit.chunk_size": 2, "rledit.edit_lr": 1e-3, "rledit.seq_len": 2},
        **{"rledit.back_depth": 2, "cloc": 0.6, "grad_clip": 1.0},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_trainer(run_dir, alg="mend", **overrides):
    build, _, _ = TINY["llama"]
    model = build()
    cfg = make_config("llama", alg=alg, **{**SETTINGS[alg], **overrides})
    utils.seed_everything(cfg.seed)
    cls, n = editor_class(alg), cfg.data.n_edits
    train, val = SyntheticEdits(48, n_edits=n, seed=0), SyntheticEdits(16, n_edits=n, seed=1)
    return EditTrainer(lambda: cls(model, cfg), cfg, train, val, str(run_dir))


def _join(rank: int, world: int, rendezvous: str) -> None:
    """Join the group through a rendezvous file (distributed.init then finds it joined). Not through a port: one the
    parent found free could be taken by another program before rank 0 listens on it (seconds later, after the
    imports), and a rank could then meet another run's group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    distributed.init(make_config("llama"), torch.device("cpu"))


def _leave() -> None:
    """Leave the group once every rank is done with it: no rank closes its connections under another's last message."""
    distributed.shutdown(wait=True)


def _first_step(trainer, each_from_the_start: bool = False) -> dict:
    """The gradient of one accumulation window (before the optimiser step), then the editor after it, as the trainer
    makes them (batches grouped by ``batches_per_step``). ``each_from_the_start``: every step of the window starts
    from the statistics the window started with, as each rank of a distributed run does (one process otherwise
    starts each step from the statistics the window's earlier steps left)."""
    editor = trainer.editor
    steps = trainer._train_steps()
    start, after = editor.statistics_state(), []
    for _ in range(trainer.config.accumulate_bs // trainer.dist.world_size):
        if each_from_the_start:
            editor.load_statistics_state(start)
        before = distributed.stats_snapshot(editor)
        trainer.edit_step(next(steps), training=True)
        distributed.merge_running_stats(editor, before)
        trainer.state.step += trainer.dist.world_size
        after.append(editor.statistics_state())
    grads = {n: p.grad.detach().clone() for n, p in editor.named_parameters()}
    trainer._optimizer_step()
    return {
        "grads": grads,
        "editor": {k: v.clone() for k, v in editor.state_dict().items()},
        "statistics": editor.statistics_state(),
        "start": start,
        "after": after,
        "lifelong": editor.lifelong_state(),
    }


def union(start: dict, parts: list) -> dict:
    """The statistics of ``start`` plus the new samples of each of ``parts`` (each ``start`` plus its own samples),
    from the sums that samples add: the count, count * mean, and m2 + count * mean^2 (the sum of squares; also
    additive for MALMEN's m2, built from unbiased chunk variances). An independent check of Chan's merge."""
    out = {}
    for key in start:
        if key.endswith(".count"):
            name = key[: -len(".count")]
            c0, mean0, m20 = (start[f"{name}.{k}"].double() for k in ("count", "mean", "m2"))
            c, s, q = c0, c0 * mean0, m20 + c0 * mean0**2
            for part in parts:
                ci, meani, m2i = (part[f"{name}.{k}"].double() for k in ("count", "mean", "m2"))
                c, s, q = c + ci - c0, s + ci * meani - c0 * mean0, q + (m2i + ci * meani**2) - (m20 + c0 * mean0**2)
            out[key], out[f"{name}.mean"], out[f"{name}.m2"] = c, s / c, q - s**2 / c
    return out


def _grad_worker(rank, world, rendezvous, out_dir, overrides, alg="mend"):
    _join(rank, world, rendezvous)
    result = _first_step(make_trainer(os.path.join(out_dir, "run"), alg=alg, **overrides))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave()


def _run_worker(rank, world, rendezvous, out_dir):
    _join(rank, world, rendezvous)
    writes = []
    save, write_json = checkpoints.atomic_torch_save, evaluation.write_json
    checkpoints.atomic_torch_save = lambda obj, path: (writes.append(os.path.basename(path)), save(obj, path))
    evaluation.write_json = lambda obj, path: (writes.append(os.path.basename(path)), write_json(obj, path))
    t = make_trainer(os.path.join(out_dir, "run"))
    report = evaluation.train_and_evaluate(t)
    torch.save(
        {"writes": writes, "editor": t.editor.state_dict(), "report": report, "step": t.state.step},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    _leave()


def spawn(fn, *args, world=2):
    with tempfile.TemporaryDirectory(prefix="rendezvous-") as rendezvous:
        mp.spawn(fn, args=(world, os.path.join(rendezvous, "store"), *args), nprocs=world, join=True)


@pytest.mark.parametrize("norm", [False, True])
def test_two_processes_give_the_gradient_and_editor_of_one(tmp_path, norm):
    overrides = {"mend.norm": norm}
    one = _first_step(make_trainer(tmp_path / "one", **overrides))  # one process accumulating batches 0 and 1
    spawn(_grad_worker, str(tmp_path), overrides)  # rank 0 takes batch 0, rank 1 batch 1
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, g in one["grads"].items():
        # DDP all-reduces: both ranks hold the same averaged gradient
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        if not norm:  # equal to one process's; with normalisation each rank normalises with its own batch first
            torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-4, atol=1e-7)
    for key, value in one["editor"].items():
        assert torch.equal(ranks[0]["editor"][key], ranks[1]["editor"][key]), key
        if not norm or key.endswith(("count", "mean", "m2")):
            # the merged normalisation statistics are those of one process after the same two batches
            torch.testing.assert_close(ranks[0]["editor"][key].double(), value.double(), rtol=1e-4, atol=1e-6)


def two_ranks_against_one(tmp_path, alg: str) -> tuple:
    """The first accumulation window of ``alg`` on 2 processes (one batch, or sequence, each) and on one process
    twice: ``one`` accumulating both steps as a single run does, ``alone`` starting each step from the statistics of
    the window's start, as each rank does."""
    one = _first_step(make_trainer(tmp_path / "one", alg=alg))
    alone = _first_step(make_trainer(tmp_path / "alone", alg=alg), each_from_the_start=True)
    spawn(_grad_worker, str(tmp_path), {}, alg)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    return one, alone, ranks


def check_staged_editor(one, alone, ranks) -> None:
    """What the two ranks of an editor with running statistics must give (the tests below)."""
    for name, g in alone["grads"].items():
        # DDP all-reduces: both ranks hold the same average, the gradient of one process whose steps each start from
        # the window's statistics (one process accumulating both steps normalises the second with the first's
        # samples too: a real difference, as for MEND's norm=True above)
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(one["grads"][n], g) for n, g in alone["grads"].items())
    for key in one["editor"]:  # bit-identical editors after the optimiser step, statistics included
        assert torch.equal(ranks[0]["editor"][key], ranks[1]["editor"][key]), key
    for key, value in alone["editor"].items():  # the network after the step: that of the same averaged gradient
        if not key.endswith(("count", "mean", "m2")):
            torch.testing.assert_close(ranks[0]["editor"][key], value, rtol=1e-4, atol=1e-6)
    # the merged statistics hold the samples of both ranks' steps (those of `alone`'s two steps)
    merged = union(alone["start"], alone["after"])
    assert merged.keys() == one["statistics"].keys()
    for key, value in merged.items():
        if key.endswith(".count"):  # the samples of both steps: as many as one process's
            assert value.item() == one["statistics"][key].item() > 0, key
        torch.testing.assert_close(ranks[0]["statistics"][key].double(), value, rtol=1e-5, atol=1e-9)


def test_two_malmen_processes_average_the_gradient_of_its_staged_backward(tmp_path):
    """MALMEN hands the trainer's backward a surrogate loss, sum_p <p, dL/dp>, built from gradients it took itself
    (through the least-squares solve, by hand): DDP's all-reduce averages the gradient of that loss over the ranks.
    Its statistics' samples (keys and gradients of the unedited model) do not depend on the statistics, so the merged
    statistics are also exactly those of one process after the same two batches."""
    one, alone, ranks = two_ranks_against_one(tmp_path, "malmen")
    check_staged_editor(one, alone, ranks)
    for key, value in one["statistics"].items():
        torch.testing.assert_close(ranks[0]["statistics"][key].double(), value.double(), rtol=1e-5, atol=1e-9)


def test_two_rledit_processes_train_one_sequence_each_and_end_with_the_same_lifelong_state(tmp_path):
    """RLEdit: each rank trains its own sequence of 2 consecutive batches, its gradient clipped to grad_clip as a
    single process clips each sequence's; DDP averages the two clipped sequences, and the ranks end with the same
    editor and the same lifelong state (the statistics every edit of both sequences updated, merged). Not one
    process's statistics: the later edits of a sequence are made on a model whose earlier updates the statistics
    shaped, and the second sequence's rank did not see the first sequence's samples."""
    one, alone, ranks = two_ranks_against_one(tmp_path, "rledit")
    check_staged_editor(one, alone, ranks)
    clip = SETTINGS["rledit"]["grad_clip"]
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ranks[0]["grads"].values()]))
    assert norm <= clip * (1 + 1e-5)  # the mean of two sequences clipped to grad_clip each
    assert ranks[0]["lifelong"] and ranks[0]["lifelong"].keys() == one["lifelong"].keys()
    for key, value in ranks[0]["lifelong"].items():
        assert torch.equal(value, ranks[1]["lifelong"][key]), key
        assert torch.equal(value, ranks[0]["editor"]["net." + key]), key


def test_a_two_process_run_ends_with_one_editor_and_rank_0_alone_writes(tmp_path):
    spawn(_run_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r1["writes"] == []
    assert {"best.pt", "last.pt", "results.json"} <= set(r0["writes"])
    for key in r0["editor"]:
        assert torch.equal(r0["editor"][key], r1["editor"][key]), key
    assert r0["step"] == r1["step"] == TRAIN["max_iters"]
    for key, value in r0["report"]["results"].items():  # validation reduced over ranks: the same everywhere
        assert key.startswith(("time/", "eval_time/elapsed")) or r1["report"]["results"][key] == value, key
    assert r0["report"]["results"]["eval_time/n_edits"] == 3
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["steps"] == TRAIN["max_iters"]
    last = checkpoints.read_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt"))
    assert len(last["rng_ranks"]) == 2


def test_accumulate_bs_must_split_over_the_processes():
    with pytest.raises(Exception, match=r"accumulate_bs=3 .* multiple of the number of processes"):
        distributed.check_world_size(make_config("llama", accumulate_bs=3), 2)


# -- the command lines of docs/scaling.md, scaled down ---------------------------------------------------------

SCALED_DOWN = ("max_iters=8", "val_interval=4", "val_steps=3", "accumulate_bs=2", "log_interval=2")


def torchrun(ws, launcher: list, *overrides, run_dir, timeout=300, alg="mend", scaled=SCALED_DOWN):
    cmd = cli(ws, *scaled, *overrides, run_dir=run_dir, alg=alg)
    assert cmd[1:3] == ["-m", "run"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *cmd[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def test_torchrun_two_processes_on_one_machine(workspace):  # noqa: F811
    run_dir = workspace["root"] / "torchrun-2"
    proc = torchrun(workspace, ["--standalone", "--nproc_per_node=2"], run_dir=run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Distributed: 2 processes, backend gloo" in out
    assert "Estimated memory per device" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 8 and results["results"]["eval_time/n_edits"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert (run_dir / ".hydra").is_dir() and not os.path.exists(os.path.join(ROOT, ".hydra"))


# MALMEN and RLEdit on the command line: 2 optimiser steps of 2 meta-steps (RLEdit: sequences of 2 batches) of 3 edits,
# a validation after each, and the final comparison with the untrained editor split over the ranks.
STAGED_CLI = (
    *("max_iters=4", "val_interval=2", "val_steps=2", "accumulate_bs=2", "log_interval=2", "eval.final_steps=2"),
    *("data.n_edits=3", "batch_size=6", "val_batch_size=6"),
)
STAGED_ALGS = {
    "malmen": ("malmen.rank=8", "malmen.chunk_size=2"),
    "rledit": ("rledit.rank=8", "rledit.chunk_size=2", "rledit.seq_len=2", "rledit.back_depth=2"),
}


@pytest.mark.parametrize("alg", STAGED_ALGS)
def test_torchrun_trains_malmen_and_rledit_on_two_processes(workspace, alg):  # noqa: F811
    run_dir = workspace["root"] / f"torchrun-{alg}"
    launcher = ["--standalone", "--nproc_per_node=2"]
    proc = torchrun(workspace, launcher, *STAGED_ALGS[alg], run_dir=run_dir, alg=alg, scaled=STAGED_CLI)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Distributed: 2 processes, backend gloo" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["alg"] == alg and results["train"]["steps"] == 4
    assert results["results"]["eval_time/n_edits"] == 2 * 3 * (2 if alg == "rledit" else 1)  # sequences of 2
    last = checkpoints.read_checkpoint(str(run_dir / "checkpoints" / "last.pt"))
    assert len(last["rng_ranks"]) == 2 and last["trainer"]["batches_drawn"] == 4 * (2 if alg == "rledit" else 1)


@pytest.mark.slow
def test_torchrun_two_nodes_by_rendezvous(workspace):  # noqa: F811
    """Two 'nodes' (here both on localhost), one process each, meeting at a c10d rendezvous endpoint."""
    run_dir = workspace["root"] / "torchrun-nodes"
    port = free_port()
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    launcher.append("--rdzv_id=mend-test")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = cli(workspace, *SCALED_DOWN, run_dir=run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *cmd[1:]]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outs)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 8


def _resume_worker(rank, world, rendezvous, out_dir):
    import signal

    _join(rank, world, rendezvous)
    overrides = {"accumulate_bs": 4, "checkpoint_interval": 2}  # the stop falls inside a gradient accumulation
    straight = make_trainer(os.path.join(out_dir, "straight"), **overrides)
    evaluation.train_and_evaluate(straight)
    stopped = make_trainer(os.path.join(out_dir, "stopped"), **overrides)
    step = stopped._train_step

    def step_then_signal(*args, **kwargs):  # SIGTERM reaches rank 1 only, after step 2
        out = step(*args, **kwargs)
        if rank == 1 and stopped.state.step == 2:
            stopped._stop_signal = signal.SIGTERM
        return out

    stopped._train_step = step_then_signal
    try:
        evaluation.train_and_evaluate(stopped)
        interrupted_at = None
    except TrainingInterrupted:
        interrupted_at = stopped.state.step
    resumed = make_trainer(os.path.join(out_dir, "stopped"), resume=os.path.join(out_dir, "stopped"), **overrides)
    evaluation.train_and_evaluate(resumed)
    torch.save(
        {
            "interrupted_at": interrupted_at,
            "straight": straight.editor.state_dict(),
            "resumed": resumed.editor.state_dict(),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    _leave()


def test_a_signal_on_one_rank_stops_all_and_resume_ends_like_the_straight_run(tmp_path):
    spawn(_resume_worker, str(tmp_path))
    for r in range(2):
        out = torch.load(tmp_path / f"rank{r}.pt")
        assert out["interrupted_at"] == 2  # both ranks stopped at the same step
        for key, value in out["straight"].items():
            torch.testing.assert_close(out["resumed"][key], value, rtol=1e-5, atol=1e-7)
