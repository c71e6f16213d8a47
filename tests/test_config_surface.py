"""The configuration surface of ``python -m run`` as a new user meets it: a key the schema does not declare is refused
with or without '+' (and the config groups still take theirs), a value that cannot be meant (a step budget beyond a
year, a rank above the edited layers' width) is refused or warned of with its key named, and ``--help`` lists the
groups, their files and the frequently used keys. The command lines run for real where that is cheap: they stop
before torch loads."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, SyntheticEdits, make_config
from omegaconf import OmegaConf
from test_run import ROOT, run_cli, workspace  # noqa: F401  (workspace is a fixture)

import trainer as trainer_module
from algs import ALGS, check_shapes, settings_help
from algs.mend.editor import MEND
from config_schema import GROUPS, ConfigError, check_command_line, check_key, compose_config, validate_config
from data_classes import DATASETS
from ranges import MAX_PLAUSIBLE_STEPS, OPTIMISERS
from run import KEY_HELP, usage
from trainer import EditTrainer

BASE = ["+alg=mend", "+experiment=gen", "+model=distilgpt2"]


def run_command(*args, importtime: bool = False) -> subprocess.CompletedProcess:
    """``python -m run <args>`` from the project root, with Python's import timing on stderr if asked."""
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "run", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def imported(stderr: str) -> set:
    """The top-level modules an ``-X importtime`` run imported."""
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", stderr, re.M)}


def messages(stderr: str) -> list:
    """The lines of stderr that are not import timing."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


def validated(overrides, **changes):
    cfg = compose_config(overrides)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=True)
    validate_config(cfg, algs=ALGS, tasks=DATASETS)
    return cfg


# -- keys the schema does not declare ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("+val_every=30", "Did you mean val_interval"),  # Hydra's hint said to add the '+', which ran it unread
        ("val_every=30", "Did you mean val_interval"),
        ("+mend.lrr=1", "Did you mean mend.lr"),
        ("mend.lrr=1", "Did you mean mend.lr"),
        ("max_iters=abc", "could not be converted to Integer, full_key: max_iters"),
        ("alg=ft", "a config group is chosen with a '+'"),  # Hydra's help said group=option, which failed
        ("+model=gpt2", "+model= is given 2 times (distilgpt2, gpt2): give one."),
        ("max_iters=1000000000000", "max_iters=1000000000000: expected at most 3153600000 with no max_time"),
    ],
)
def test_a_mistyped_command_line_stops_in_one_line_before_torch_loads(override, expected):
    proc = run_command(*BASE, override, "hydra.run.dir=/nonexistent/never-made", importtime=True)
    lines = messages(proc.stderr) + [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "Traceback" not in lines[0] and "To append to your" not in lines[0]  # no Hydra hint of adding '+'
    assert "torch" not in imported(proc.stderr)


def test_a_command_line_without_a_model_says_how_to_choose_one():
    proc = run_command("+alg=mend", "+experiment=gen", "hydra.run.dir=/nonexistent/never-made")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].endswith("model has no value: set it with +model=<name> (a file of config/model/, e.g. smollm2).")


def test_the_config_groups_still_take_their_plus():
    """'+' is how a group's file is chosen: every group (and Hydra's own, and a defaults entry's override) passes."""
    assert set(GROUPS) >= {"alg", "experiment", "model", "schedule"}
    check_command_line(["+alg=ft", "+experiment=qa", "+model=t5small", "+schedule=smollm2-cpu", "max_iters=7"])
    check_command_line(["+model=smollm2", "+alg=mend", "+experiment=gen", "schedule@_global_=minilm-cpu"])
    check_command_line([*BASE, "hydra/job_logging=stdout", "+hydra.job.env_set.X=1"])
    cfg = compose_config(["+alg=ft", "+experiment=qa", "+model=t5small", "+schedule=smollm2-cpu"])
    assert cfg.alg == "ft" and cfg.task == "qa" and cfg.max_iters == 400  # the schedule's


def test_a_misspelt_file_of_a_group_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError) as refused:
        check_command_line(["+alg=mend", "+experiment=gen", "+model=gpt2-xl"])
    message = str(refused.value)
    assert message.startswith("+model=gpt2-xl: no file config/model/gpt2-xl.yaml; the options of +model= are ")
    assert "Did you mean +model=gpt2xl" in message and " distilgpt2, " in message


def test_a_group_given_without_plus_gets_our_hint_not_hydras():
    with pytest.raises(ConfigError, match=r"^experiment=gen: a config group is chosen with a '\+' .* \+experiment=gen"):
        check_command_line(["+alg=mend", "experiment=gen", "+model=smollm2"])


# -- values that cannot be meant ------------------------------------------------------------------------------


def test_a_step_budget_beyond_a_year_is_refused_unless_the_clock_bounds_it():
    with pytest.raises(ConfigError) as refused:
        validated(BASE, max_iters=10**12)
    message = str(refused.value)
    assert message.startswith("max_iters=1000000000000: expected at most 3153600000 with no max_time")
    assert "317 years" in message and "max_time=<seconds>" in message
    validated(BASE, max_iters=MAX_PLAUSIBLE_STEPS)  # a year at the fastest rate: allowed
    validated(BASE, max_iters=10**12, max_time=3600.0)  # bounded by the clock
    validated(BASE, max_iters=10**12, eval_only=True)  # nothing trains


def test_a_fine_tuning_budget_per_edit_beyond_a_year_is_refused_unless_the_clock_bounds_it():
    with pytest.raises(ConfigError, match=r"^ft.max_edit_steps=10000000000: expected at most .* ft.time_limit"):
        validated(BASE, **{"ft.max_edit_steps": 10**10})
    validated(BASE, **{"ft.max_edit_steps": 10**10, "ft.time_limit": 60.0})


def test_an_optimiser_step_training_never_reaches_is_warned_of(caplog):
    with caplog.at_level(logging.WARNING):
        validated(BASE, max_iters=4)  # accumulate_bs=10
    assert "accumulate_bs=10 is above max_iters=4" in caplog.text and "never updates it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        validated(BASE, max_iters=4, accumulate_bs=2)
    assert "accumulate_bs" not in caplog.text


def test_a_rank_beyond_any_layer_is_refused_before_anything_loads():
    with pytest.raises(ConfigError, match=r"^mend.rank=100000: expected an integer in \[1, 65536\]"):
        validated(BASE, **{"mend.rank": 100000})


GPT2_SHAPES = {"transformer.h.5.mlp.c_fc.weight": (768, 3072), "transformer.h.5.mlp.c_proj.weight": (3072, 768)}


def test_mend_warns_of_a_rank_above_every_editor_mlps_width():
    cfg = compose_config(BASE)
    assert check_shapes(cfg, GPT2_SHAPES) == []  # the paper's 1920 on distilGPT-2: MLPs of width 768 + 3072
    cfg.mend.rank = 5000
    (warning,) = check_shapes(cfg, GPT2_SHAPES)
    assert warning.startswith("mend.rank=5000 is above the width of every editor MLP of this model (at most 3840")
    assert "the same as with mend.rank=3840" in warning
    cfg.mend.rank, cfg.mend.combine, cfg.mend.one_sided = 1920, False, True  # one MLP on the smaller side: 768
    assert "at most 768" in check_shapes(cfg, GPT2_SHAPES)[0]


def test_malmen_warns_of_a_rank_above_every_networks_width():
    cfg = compose_config(["+alg=malmen", *BASE[1:]])
    assert check_shapes(cfg, GPT2_SHAPES) == []  # the original's 1920 on distilGPT-2: networks of width 3840
    cfg.malmen.rank = 4000
    (warning,) = check_shapes(cfg, GPT2_SHAPES)
    assert warning.startswith("malmen.rank=4000 is above the width of every MALMEN network of this model (at most 3840")


def test_ft_refuses_a_rank_above_what_a_residual_can_have():
    cfg = compose_config(["+alg=ft", *BASE[1:]])
    assert check_shapes(cfg, GPT2_SHAPES) == []  # full residual
    cfg.ft.rank = 768
    assert check_shapes(cfg, GPT2_SHAPES) == []  # full rank, and allowed
    cfg.ft.rank = 769
    with pytest.raises(ConfigError, match=r"^ft.rank=769: expected at most 768, .* transformer.h.5.mlp.c_fc.weight"):
        check_shapes(cfg, GPT2_SHAPES)


def test_the_run_checks_the_rank_against_the_loaded_model(workspace):  # noqa: F811
    """The tiny GPT-2 of test_run is 32 wide: ft.rank=33 stops after the model loads, before any data is built."""
    proc = run_cli(workspace, "ft.rank=33", run_dir=workspace["root"] / "rank", alg="ft")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "ft.rank=33: expected at most 32" in out and "Data:" not in out  # no data set built first


def test_training_warns_when_the_measured_rate_needs_over_a_year(caplog):
    """After its first steps, a run whose max_iters would take over a year at the rate measured says so."""
    trainer = SimpleNamespace(
        config=SimpleNamespace(max_iters=10**9, max_time=None, early_stop_patience=20000),
        state=SimpleNamespace(step=10),
        dist=SimpleNamespace(is_main=True),
    )
    with caplog.at_level(logging.WARNING):
        EditTrainer._warn_of_a_long_schedule(trainer, 10, 10.0)  # 1 step/s: 31.7 years
    assert "max_iters=1000000000: at the 1 steps/s of the first 10 steps, the run would take 31.7 years" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        EditTrainer._warn_of_a_long_schedule(trainer, 10, 0.1)  # 100 steps/s: 116 days
        trainer.config.max_time = 3600.0
        EditTrainer._warn_of_a_long_schedule(trainer, 10, 10.0)
    assert caplog.text == ""


def test_the_training_loop_times_its_first_steps_and_warns(tmp_path, monkeypatch, caplog):
    """The loop itself calls the check after its first 10 steps (each step faked here, one second of a fake clock)."""
    cfg = make_config("llama", max_iters=10**9, log_interval=1000, val_interval=1000)
    model = TINY["llama"][0]()
    trainer = EditTrainer(lambda: MEND(model, cfg), cfg, SyntheticEdits(16, seed=0), SyntheticEdits(8), str(tmp_path))
    clock = iter(range(10**6))
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))

    def step(batch, averager, start, interval):
        trainer.state.step += 1
        return "early_stop" if trainer.state.step == 12 else None

    monkeypatch.setattr(trainer, "_train_step", step)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.step == 12
    assert re.search(r"max_iters=1000000000: at the [0-9.]+ steps/s of the first 10 steps, the run would", caplog.text)


def test_an_optimiser_torch_does_not_have_is_refused_before_anything_loads():
    """opt=adam was an AttributeError traceback once the model and data had loaded (the trainer's getattr)."""
    with pytest.raises(ConfigError, match=r"^opt='adam': expected an optimiser of torch.optim: .* opt=Adam\?"):
        validated(BASE, opt="adam")
    with pytest.raises(ConfigError, match=r"^ft.opt='RMSProp': expected .* Did you mean ft.opt=RMSprop\?"):
        validated(BASE, **{"ft.opt": "RMSProp"})
    for name in OPTIMISERS:  # each name the check takes is one torch.optim has
        assert issubclass(getattr(torch.optim, name), torch.optim.Optimizer), name
        validated(BASE, opt=name, **{"ft.opt": name})


# -- --help ---------------------------------------------------------------------------------------------------


def test_help_lists_the_groups_their_files_and_the_frequent_keys_fast():
    proc = run_command("--help", importtime=True)
    assert proc.returncode == 0 and messages(proc.stderr) == [], proc.stderr[-2000:]
    text = proc.stdout
    for group in GROUPS:
        assert f"+{group}=<name>" in text
        for name in os.listdir(os.path.join(ROOT, "config", group)):
            assert re.search(rf"^    {re.escape(name[: -len('.yaml')])} +\S", text, re.M), name  # with a description
    for key in [*KEY_HELP, *settings_help()]:
        assert re.search(rf"^  {re.escape(key)}=\S+ +\S", text, re.M), key
    assert "  max_iters=500000 " in text and "  mend.rank=1920 " in text and "model.name=<per model>" in text
    assert "(group=option)" not in text and "Override anything" not in text  # Hydra's own help is gone
    assert max(len(line) for line in text.splitlines()) <= 120
    assert not {"torch", "transformers"} & imported(proc.stderr)
    assert run_command("-h").stdout == text


def test_the_help_names_only_declared_keys_and_its_examples_run():
    for key in [*KEY_HELP, *settings_help()]:
        check_key(key)
    lines = [line.split("#")[0] for line in usage().splitlines() if line.strip().startswith("python -m run")]
    examples = [line.replace("<run>", "gen_mend_run").split()[3:] for line in lines]  # <run>: a run directory
    assert len(examples) >= 2 and ["+alg=mend", "+experiment=gen", "+model=distilgpt2"] == examples[1][:3]
    for overrides in examples:
        check_command_line(overrides)
        validated(overrides)


def test_hydras_own_flags_still_work():
    proc = run_command(*BASE, "--cfg", "job")
    assert proc.returncode == 0 and "alg: mend" in proc.stdout and "max_iters: 500000" in proc.stdout
    proc = run_command("--hydra-help")
    assert proc.returncode == 0 and "Hydra" in proc.stdout


def test_the_example_of_data_n_edits_alone_says_how_to_fix_it():
    """data.n_edits=5 with the default batch of 2 cannot be met: the refusal gives the command line that works."""
    with pytest.raises(ConfigError, match=r"e.g. data.n_edits=5 batch_size=6 val_batch_size=6"):
        validated([*BASE, "data.n_edits=5"])
    validated([*BASE, "data.n_edits=5", "batch_size=6", "val_batch_size=6"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_one_line_before_the_model_loads(workspace):  # noqa: F811
    proc = run_cli(workspace, "device=cuda", run_dir=workspace["root"] / "no-cuda")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if "device=cuda" in line]
    assert errors and "CUDA is not available" in errors[0] and "device=cpu" in errors[0]
    assert not any("Loaded" in line for line in lines)  # refused before the base model loads
