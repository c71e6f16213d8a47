"""The fault suite: checkpoints, resume, determinism and bad input (docs/faults.md lists what each test shows).

In-process tests use tiny models built from config classes and the synthetic edit set; the command-line
tests (determinism, SIGTERM then resume, one-line errors) run ``python -m run`` on the tiny GPT-2 of
test_run.py. Everything runs on the CPU.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, SyntheticEdits, freeze, make_config
from test_run import INNER, ROOT, workspace  # noqa: F401  (workspace is a fixture)
from test_run import cli_command as cli

import meta_loss
import utils
from algs.enn.editor import ENN
from algs.mend.editor import MEND
from checkpoints import load_checkpoint, read_checkpoint
from config_schema import ConfigError, validate_config
from data_classes import DataError
from data_classes.gen import GenDataset, read_original
from errors import CheckpointError, CheckpointWriteError, NonFiniteLossError, TrainingInterrupted
from evaluation import train_and_evaluate
from models import InnerParamsError, ModelLoadError, check_inner_params, get_model
from trainer import EditTrainer

# -- in-process training on a tiny Llama ---------------------------------------------------------------------

TRAIN = dict(
    mend__lr=1e-3,
    mend__lr_lr=1e-2,
    mend__edit_lr=1e-3,
    accumulate_bs=4,
    max_iters=12,
    val_interval=6,
    checkpoint_interval=3,  # resume points in the middle of a gradient accumulation
    val_steps=4,
    log_interval=4,
    **{"eval.compare_untrained": False},
)


def make_trainer(run_dir, arch="llama", model=None, **overrides):
    build, _, _ = TINY[arch]
    model = model if model is not None else build()
    cfg = make_config(arch, **{**TRAIN, **overrides})
    utils.seed_everything(cfg.seed)
    return EditTrainer(
        lambda: MEND(model, cfg), cfg, SyntheticEdits(48, seed=0), SyntheticEdits(16, seed=1), str(run_dir)
    )


def metrics(report):
    return {k: v for k, v in report["results"].items() if not k.startswith(("time/", "eval_time/"))}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short training run: its directory and report."""
    run_dir = tmp_path_factory.mktemp("trained")
    report = train_and_evaluate(make_trainer(run_dir))
    return run_dir, report


def test_checkpoints_hold_the_whole_state_and_load_without_code(trained_run):
    run_dir, report = trained_run
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left
    last = read_checkpoint(str(ckpt_dir / "last.pt"))
    assert last["step"] == 12 and last["trainer"]["finished"] and last["trainer"]["batches_drawn"] == 12
    assert {"editor", "opt", "lr_opt", "grads", "stopper", "rng", "meta"} <= set(last)
    assert any(k.endswith(".mean") for k in last["editor"]) and any(k.endswith(".m2") for k in last["editor"])
    assert last["opt"]["state"] and last["lr_opt"]["state"]
    assert last["stopper"]["best_step"] == report["train"]["best_step"]
    assert isinstance(last["rng"]["torch"], torch.Tensor)
    identity = last["meta"]["base_model"]
    assert identity["class"] == "LlamaForCausalLM"
    assert set(identity["edited_weights"]) == set(TINY["llama"][1])
    assert all(len(w["sha256"]) == 16 for w in identity["edited_weights"].values())
    # torch.load(weights_only=True) reads it: nothing in it needs code to be run
    torch.load(ckpt_dir / "best.pt", weights_only=True)


def test_archive_accepts_a_checkpoint_file_or_a_run_directory(trained_run):
    run_dir, _ = trained_run
    cfg = make_config("llama", **TRAIN)
    by_dir = load_checkpoint(str(run_dir), cfg)
    by_file = load_checkpoint(str(run_dir / "checkpoints" / "best.pt"), cfg)
    assert by_dir["path"] == by_file["path"] and by_dir["step"] == by_file["step"]


@pytest.mark.parametrize(
    "key, value, both",
    [
        ("model.name", "tiny-other", ("'tiny-llama'", "'tiny-other'")),
        ("model.inner_params", ["model.layers.0.mlp.up_proj.weight"], ("down_proj", "layers.0.mlp.up_proj")),
        ("alg", "enn", ("'mend'", "'enn'")),
    ],
)
def test_a_checkpoint_of_another_setting_is_refused_naming_both(trained_run, key, value, both):
    run_dir, _ = trained_run
    cfg = make_config("llama", **{key: value})
    for name, what in (("best.pt", "archive"), ("last.pt", "resume")):
        with pytest.raises(CheckpointError, match=what) as info:
            load_checkpoint(str(run_dir), cfg, name=name, key=what)
        assert all(b in str(info.value) for b in both), str(info.value)


def test_a_checkpoint_for_a_model_with_other_shapes_is_refused(trained_run):
    run_dir, _ = trained_run
    cfg = make_config("llama")
    wider = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, vocab_size=64
    )
    with pytest.raises(CheckpointError, match=r"has shape \[64, 32\].*has shape \[96, 32\]"):
        load_checkpoint(str(run_dir), cfg, model=freeze(transformers.LlamaForCausalLM(wider)))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_truncated_or_corrupted_checkpoint_is_refused(trained_run, tmp_path, damage):
    good = (trained_run[0] / "checkpoints" / "best.pt").read_bytes()
    bad = tmp_path / "best.pt"
    bad.write_bytes({"truncated": good[: len(good) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    says = {"truncated": "is truncated", "garbage": "is not a file that torch.save wrote", "empty": "is empty"}[damage]
    with pytest.raises(CheckpointError, match=f"could not be read as a checkpoint: it {says}"):
        load_checkpoint(str(bad), make_config("llama"))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_loading_a_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "evil.pt"
    torch.save({"editor": {}, "meta": "{}", "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        load_checkpoint(str(path), make_config("llama"))
    assert not marker.exists()


def test_no_room_for_a_checkpoint_stops_with_a_clear_message_and_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_iters=12, val_interval=100)
    last = tmp_path / "checkpoints" / "last.pt"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if trainer.state.step >= 6:  # the second resume point: write part of it, then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(utils.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        trainer.train()
    msg = str(info.value)
    assert "no space left on the device" in msg and "stopped at step 6" in msg
    assert "previous last.pt is intact" in msg and f"resume={tmp_path}" in msg
    assert read_checkpoint(str(last))["step"] == 3  # the previous resume point, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]  # the partial file was removed


def test_atomic_writes_leave_files_as_readable_as_any_new_file(tmp_path):
    """The temporary files they rename into place are private (mkstemp's 0600); the outputs must not be."""
    mask = os.umask(0o027)
    try:
        utils.atomic_write_text("{}", str(tmp_path / "results.json"))
        utils.atomic_torch_save({"step": 1}, str(tmp_path / "last.pt"))
    finally:
        os.umask(mask)
    for name in ("results.json", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # 0666 less the umask


def _interrupt_at(trainer, step, signum=signal.SIGTERM):
    """Deliver a stop signal while the trainer runs step ``step`` (through its real handler)."""
    edit_step = trainer.edit_step

    def edit_step_then_signal(batch, training, **kwargs):
        out = edit_step(batch, training, **kwargs)
        if training and trainer.state.step + 1 == step:
            os.kill(os.getpid(), signum)
        return out

    trainer.edit_step = edit_step_then_signal


@pytest.mark.parametrize("stop_at, signum", [(5, signal.SIGTERM), (6, signal.SIGINT), (9, signal.SIGTERM)])
def test_interrupt_then_resume_gives_the_straight_run(tmp_path, trained_run, stop_at, signum):
    """Interrupted mid-accumulation (step 5), at a validation step (6) or after one (9): the same final metrics as
    no stop, and the same validations in the learning curve."""
    _, straight = trained_run
    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir)
    _interrupt_at(trainer, stop_at, signum)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match=f"stopped at step {stop_at}.*resume=") as info:
        train_and_evaluate(trainer)
    assert info.value.signum == signum
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert read_checkpoint(str(run_dir / "checkpoints" / "last.pt"))["step"] == stop_at

    last = read_checkpoint(str(run_dir / "checkpoints" / "last.pt"))
    resumed = make_trainer(run_dir, resume=str(run_dir))
    assert resumed.state.step == stop_at
    assert torch.equal(torch.get_rng_state(), last["rng"]["torch"])  # the RNG states are restored too
    assert torch.equal(torch.from_numpy(np.random.get_state()[1].astype(np.int64)), last["rng"]["numpy"]["key"])
    report = train_and_evaluate(resumed)
    assert report["train"]["steps"] == 12 and report["train"]["best_step"] == straight["train"]["best_step"]
    assert metrics(report) == pytest.approx(metrics(straight), rel=1e-6, abs=1e-9)

    # the learning curve survives the stop: every validation of the straight run, with the same metrics
    def curve(r):
        return [metrics({"results": {k: x for k, x in v.items() if k != "seconds"}}) for v in r["train"]["validations"]]

    assert len(curve(straight)) >= 2 and [v["step"] for v in curve(report)] == [v["step"] for v in curve(straight)]
    for got, want in zip(curve(report), curve(straight)):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_resuming_a_finished_run_only_evaluates(trained_run):
    run_dir, straight = trained_run
    resumed = make_trainer(run_dir, resume=str(run_dir), **{"results_dir": str(run_dir / "again")})
    assert resumed.state.finished
    report = train_and_evaluate(resumed)
    assert metrics(report) == pytest.approx(metrics(straight), rel=1e-6, abs=1e-9)


def test_resume_without_a_resume_point_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"resume=.*no checkpoint found.*checkpoints/last.pt"):
        make_trainer(tmp_path, resume=str(tmp_path))


def test_resume_with_optimisers_that_train_other_parameters_is_refused(tmp_path):
    """ENN's step sizes in their own optimiser, then resumed with them in the main one (enn.step_sizes)."""
    model = TINY["llama"][0]()

    def enn_trainer(step_sizes, resume=None):
        settings = {"train_base": True, "max_iters": 1, "val_interval": 100, "enn.step_sizes": step_sizes}
        cfg = make_config("llama", alg="enn", resume=resume, **settings)
        return EditTrainer(lambda: ENN(model, cfg), cfg, SyntheticEdits(8), SyntheticEdits(4), str(tmp_path))

    enn_trainer("separate").train()
    assert enn_trainer("separate", resume=str(tmp_path)).state.step == 1  # the same settings resume
    with pytest.raises(CheckpointError, match=r"resume=.*the state of the optimiser 'opt' .* does not fit"):
        enn_trainer("original", resume=str(tmp_path))


def test_same_seed_same_metrics_in_process(trained_run, tmp_path):
    assert metrics(train_and_evaluate(make_trainer(tmp_path))) == metrics(trained_run[1])


def _nan_after(monkeypatch, bad_steps):
    """Make the locality loss NaN on the given training steps (1-based)."""
    real = meta_loss.kl_loc_loss
    calls = {"n": 0}

    def kl(pre, post, mask):
        loss = real(pre, post, mask)
        if post.requires_grad:  # a training step
            calls["n"] += 1
            if calls["n"] in bad_steps:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(meta_loss, "kl_loc_loss", kl)


def test_nan_losses_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    _nan_after(monkeypatch, {2, 3, 7})
    with caplog.at_level(logging.WARNING, logger="trainer"):
        report = train_and_evaluate(make_trainer(tmp_path))
    assert report["train"]["skipped_steps"] == 3 and report["train"]["steps"] == 12
    assert "non-finite loss or gradient, step skipped (3 so far)" in caplog.text
    assert all(torch.isfinite(p).all() for p in torch.load(tmp_path / "checkpoints" / "best.pt")["editor"].values())


def test_a_nan_streak_stops_with_a_clear_message_and_keeps_the_work(tmp_path, monkeypatch):
    _nan_after(monkeypatch, set(range(5, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive training steps \(up to step 7\).*max_nonfinite"):
        train_and_evaluate(make_trainer(tmp_path, max_nonfinite_steps=3))
    last = read_checkpoint(str(tmp_path / "checkpoints" / "last.pt"))
    assert last["step"] == 6 and last["trainer"]["n_skipped"] == 3


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(workspace):  # noqa: F811
    return transformers.AutoTokenizer.from_pretrained(workspace["model"])


def _data_cfg(path, **kw):
    return make_config("gpt2", **{"data.path": str(path), **{f"data.{k}": v for k, v in kw.items()}}).data


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ('{\n  "original": ["a b c"],\n  "completions": ["a b c d"\n  "n_tokens": 1\n}', r"line 4 column 3"),
        ('{"completions": ["a b c d"]}', "missing key 'original'"),
        ('{"original": ["a b", null], "completions": ["a b c", "x"]}', r"original\[1\] must be a string"),
        ('{"original": [], "completions": []}', "are empty"),
        ('{"original": ["a b"], "completions": ["x y z"]}', r"completions\[0\] does not start with original\[0\]"),
    ],
    ids=["empty", "blank", "malformed", "missing-key", "bad-entry", "no-examples", "unpaired"],
)
def test_bad_data_files_are_refused_naming_the_file_and_place(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_original(path)
    assert str(path) in str(info.value)


def test_inputs_longer_than_the_context_are_cut_from_the_left_and_counted(tmp_path, tokenizer, caplog):
    torch.manual_seed(0)
    model = freeze(
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32))
    )
    long = " ".join(["river city museum market bridge harbour"] * 8)  # ~50 tokens
    original = [f"{long} number {i}." for i in range(6)] + ["Short one."]
    completions = [p + " and then the winter festival came" for p in original[:-1]]
    completions.append("Short one." + " tower" * 40)  # the target alone is longer than the context
    (tmp_path / "train.json").write_text(json.dumps({"original": original, "completions": completions}))
    with caplog.at_level(logging.INFO):
        data = GenDataset(tokenizer, _data_cfg(tmp_path, max_passage_tokens=64), "train", 0, str(tmp_path), model=model)
    assert data.n_truncated_to_context == 6 and data.n_skipped_too_long == 1 and len(data) == 6
    assert "6 passages were cut from the left" in caplog.text and "1 examples skipped" in caplog.text
    batch = next(data.edit_generator(4, n=1))
    for role in ("edit_inner", "edit_outer", "loc"):
        assert batch[role]["input_ids"].shape[1] <= 32
        model(input_ids=batch[role]["input_ids"], attention_mask=batch[role]["attention_mask"])  # no crash
    assert tokenizer.decode(batch["edit_inner"]["input_ids"][0]).endswith("and then the winter festival came")


def test_n_edits_not_below_batch_size_is_refused():
    cfg = make_config("llama", **{"data.n_edits": 3, "batch_size": 3})
    with pytest.raises(ConfigError, match="data.n_edits=3 must be smaller than batch_size=3"):
        validate_config(cfg, algs=["mend"], tasks=["gen"])
    with pytest.raises(ConfigError, match="resume= and archive= are exclusive"):
        validate_config(make_config("llama", resume="a", archive="b"), algs=["mend"], tasks=["gen"])
    with pytest.raises(ConfigError, match="checkpoint_interval=0"):
        validate_config(make_config("llama", checkpoint_interval=0), algs=["mend"], tasks=["gen"])


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-9f3c", "/no/such/model/dir"])
def test_a_model_that_exists_nowhere_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_config("gpt2", **{"model.name": name}).model
    with pytest.raises(ModelLoadError, match=name):
        get_model(cfg, str(tmp_path))


def test_inner_params_not_in_the_model_or_not_2d_are_refused():
    model = TINY["gpt2"][0]()
    bad = ["transformer.h.1.mlp.c_fcc.weight", "transformer.h.1.mlp.c_fc.bias", "transformer.h.9.mlp.c_fc.weight"]
    with pytest.raises(InnerParamsError) as info:
        check_inner_params(model, bad)
    msg = str(info.value)
    assert all(name in msg for name in bad) and "3 invalid entries" in msg
    assert "c_fcc.weight: not a parameter" in msg and "c_fc.bias: shape (128,) is not a 2-D weight" in msg


# -- the command line ----------------------------------------------------------------------------------------

CLI_TRAIN = (
    "max_iters=24",
    "val_interval=8",
    "checkpoint_interval=2",
    "val_steps=3",
    "log_interval=4",
    "accumulate_bs=3",
    "mend.lr=1e-3",
    "eval.compare_untrained=false",
    "silent=true",
)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(ws, *overrides, run_dir):
    return subprocess.run(cli(ws, *overrides, run_dir=run_dir), cwd=ROOT, capture_output=True, text=True, env=ENV)


def cli_metrics(run_dir):
    report = json.loads((run_dir / "results.json").read_text())
    return report, metrics(report)


@pytest.fixture(scope="module")
def straight_cli(workspace):  # noqa: F811
    run_dir = workspace["root"] / "straight"
    proc = run_cli(workspace, *CLI_TRAIN, run_dir=run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return cli_metrics(run_dir)


def test_same_config_and_seed_give_identical_metrics(workspace, straight_cli):  # noqa: F811
    run_dir = workspace["root"] / "again"
    proc = run_cli(workspace, *CLI_TRAIN, run_dir=run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report, again = cli_metrics(run_dir)
    assert again == straight_cli[1]
    assert report["train"]["best_step"] == straight_cli[0]["train"]["best_step"]


def test_sigterm_writes_a_resume_point_and_resume_ends_like_a_straight_run(workspace, straight_cli):  # noqa: F811
    run_dir = workspace["root"] / "killed"
    log = open(workspace["root"] / "killed.log", "w")
    proc = subprocess.Popen(cli(workspace, *CLI_TRAIN, run_dir=run_dir), cwd=ROOT, env=ENV, stdout=log, stderr=log)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    log.close()
    out = (workspace["root"] / "killed.log").read_text()
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM" in out and f"resume={run_dir}" in out and "Traceback" not in out
    stopped = read_checkpoint(str(last))["step"]
    assert 0 < stopped < 24 and not (run_dir / "results.json").exists()

    proc = run_cli(workspace, *CLI_TRAIN, f"resume={run_dir}", run_dir=workspace["root"] / "resumed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"from step {stopped}" in proc.stdout + proc.stderr
    report, resumed = cli_metrics(run_dir)
    assert report["train"]["steps"] == 24
    assert report["train"]["best_step"] == straight_cli[0]["train"]["best_step"]
    assert resumed == pytest.approx(straight_cli[1], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty-data", "the file is empty"),
        ("nan-loss", "3 consecutive training steps"),
        ("resume-other-inner-params", "resume: .* was trained for another setting (inner_params: checkpoint has"),
        ("corrupt-archive", "could not be read as a checkpoint"),
    ],
)
def test_command_line_faults_end_in_one_clear_line(workspace, straight_cli, tmp_path, case, message):  # noqa: F811
    straight_dir = workspace["root"] / "straight"
    overrides = ["max_iters=4", "val_steps=2", "eval.compare_untrained=false", "silent=true"]
    if case == "empty-data":
        (tmp_path / "train.json").write_text("")
        (tmp_path / "validation.json").write_text("")
        overrides.append(f"data.path={tmp_path}")
    elif case == "nan-loss":  # a base model holding a NaN weight: every loss is NaN (cedit=nan is refused up front)
        nan_model = tmp_path / "nan-gpt2"
        model = transformers.GPT2LMHeadModel.from_pretrained(workspace["model"])
        with torch.no_grad():
            model.transformer.h[1].mlp.c_proj.bias[0] = float("nan")
        model.save_pretrained(nan_model)
        transformers.AutoTokenizer.from_pretrained(workspace["model"]).save_pretrained(nan_model)
        overrides += [f"model.name={nan_model}", f"model.tokenizer_name={nan_model}", "max_nonfinite_steps=3"]
    elif case == "resume-other-inner-params":
        overrides += [f"resume={straight_dir}", "model.inner_params=[transformer.h.0.mlp.c_fc.weight]"]
    else:
        bad = tmp_path / "best.pt"
        bad.write_bytes((straight_dir / "checkpoints" / "best.pt").read_bytes()[:1000])
        overrides += ["eval_only=true", f"archive={bad}"]
    proc = run_cli(workspace, *overrides, run_dir=tmp_path / "run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert re.search(message.replace("(", r"\(").replace(")", r"\)"), out), out[-2000:]
