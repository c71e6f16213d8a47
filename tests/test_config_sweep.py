"""No traceback on any numeric input: every int and float key of the schema, swept through 0, -1, nan, inf and a
huge value, is either accepted (and then known to work: ACCEPTED says how, and the tests below run it) or refused
before anything loads with one line that names the key and its value.

The sweep is generated from the schema (``config_schema.Config``, nested sections included, with the settings group of
every registered editor, ``algs/<name>/__init__.py``) and runs in-process:
each value is parsed as Hydra parses the command line and set on a composed configuration; a value OmegaConf
refuses for the key's type (``max_iters=nan``) is composed for real, as ``python -m run`` does. A few command
lines check the end-to-end behaviour: exit status 2, one line, no traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import typing
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY, SyntheticEdits, make_config, tiny_gpt2
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from test_run import ROOT, run_cli, workspace  # noqa: F401  (workspace is a fixture)

from algs import ALGS, settings_groups
from checkpoints import changed_settings
from config_schema import (
    RANGES,
    Config,
    ConfigError,
    check_command_line,
    check_key,
    compose_config,
    merge_saved_config,
    schema_keys,
    unknown_keys,
    validate_config,
)
from data_classes import DATASETS

BASE = ["+alg=mend", "+experiment=gen", "+model=smollm2"]
SWEEP = ("0", "-1", "nan", "inf", "1e30")
HUGE_INT = str(10**30)  # an int literal: Hydra and OmegaConf take it for an int key, the range must not


def numeric_keys(cls=Config, prefix: str = ""):
    """(dotted key, int or float, Optional?) for every numeric field of the schema, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) is typing.Union and type(None) in typing.get_args(kind):
            kind, optional = next(a for a in typing.get_args(kind) if a is not type(None)), True
        if dataclasses.is_dataclass(kind):
            yield from numeric_keys(kind, f"{prefix}{f.name}.")
        elif kind in (int, float):
            yield f"{prefix}{f.name}", kind, optional


KEYS = list(numeric_keys())
CASES = [(key, text) for key, kind, _ in KEYS for text in SWEEP + ((HUGE_INT,) if kind is int else ())]

# The (key, value) pairs the sweep accepts, each with why it works; the tests below run every one of them.
ACCEPTED = {
    ("seed", "0"): "the default seed",
    ("data.rewrite_equivalence", "0"): "the default: the edit loss on the paraphrase only (test_counterfact.py)",
    ("cedit", "0"): "no edit loss: training runs on the locality loss (test_accepted_edge_values_train)",
    ("cloc", "0"): "no locality loss (test_accepted_edge_values_train)",
    ("cbase", "0"): "ENN's base loss left out of the logged total (test_accepted_edge_values_train)",
    ("grad_clip", "1e30"): "gradients left unclipped (test_accepted_edge_values_train)",
    ("max_time", "1e30"): "no wall-clock limit in effect (test_accepted_edge_values_train)",
    ("mend.n_hidden", "0"): "one residual layer per MLP (test_accepted_edge_values_train)",
    ("ft.time_limit", "1e30"): "no time limit per edit in effect (test_accepted_ft_values_edit)",
    ("ft.locality.cedit", "0"): "FT+KL on the locality KL alone (test_accepted_ft_values_edit)",
    ("data.sample_temperature", "0"): "greedy targets (test_accepted_sample_temperatures_sample)",
    ("data.sample_temperature", "1e30"): "uniform sampling (test_accepted_sample_temperatures_sample)",
    ("malmen.log_ridge", "0"): "the original's default, a ridge of e^0 = 1 (tests/test_malmen.py's golden values)",
    ("malmen.log_ridge", "-1"): "a starting ridge of e^-1: any finite log-ridge is a positive ridge",
    ("rledit.log_ridge", "0"): "the original's default, a ridge of e^0 = 1 (tests/test_rledit.py's golden values)",
    ("rledit.log_ridge", "-1"): "a starting ridge of e^-1: any finite log-ridge is a positive ridge",
    ("rledit.time_decay", "0"): "each batch's loss alone (test_rledit.py::test_a_decay_of_zero_counts_each_batch...)",
    ("rledit.reg_coef", "0"): "no penalty (test_rledit.py::test_the_penalty_changes_no_gradient_as_in_the_orig...)",
    **{
        (f"{alg}.{key}", "0"): f"{alg} without the {what} (test_locate_edit.py::test_zero_kl_and_weight_decay_edit)"
        for alg in ("rome", "memit", "alphaedit")
        for key, what in (("kl_factor", "KL term"), ("v_weight_decay", "weight decay of the target vector"))
    },
}

# Keys whose negative values mean something: -1 is not the "unset" or "off" it would be for a count or a rate.
SIGNED_KEYS = {"malmen.log_ridge", "rledit.log_ridge"}  # the log of the ridge: every finite value is a positive ridge


@pytest.fixture(scope="module")
def base_cfg():
    return compose_config(BASE)


def assert_one_line_naming(message: str, key: str):
    assert "\n" not in message and f"{key}=" in message, message


def test_every_numeric_key_has_a_range():
    assert {key for key, _, _ in KEYS} == set(RANGES)
    for key, _, optional in KEYS:
        assert bool(RANGES[key].null) == optional, f"{key}: the range should say what null means iff it is Optional"
    assert len(KEYS) > 40 and {"mend.rank", "ft.locality.batch_size", "data.n_edits", "data.max_length"} <= set(RANGES)


def test_the_sweep_covers_every_registered_editors_keys():
    """The key list comes from the registry: each editor's numeric keys, nested ones included, are swept."""
    assert set(settings_groups()) == set(ALGS) and "mend" in ALGS
    for name, group in settings_groups().items():
        keys = {key for key, _, _ in numeric_keys(group, f"{name}.")}
        assert keys and keys <= {key for key, _, _ in KEYS}, name
        assert {key for key, _ in CASES if key.startswith(f"{name}.")} == keys


def test_every_shipped_config_passes():
    """The ranges refuse nothing the configs in config/ set: every model file (with an experiment it runs) and
    every editor."""
    first_task = {"causal_lm": "gen", "seq2seq": "qa", "classifier": "fc"}
    model_dir = os.path.join(ROOT, "config", "model")
    for name in sorted(os.listdir(model_dir)):
        file = OmegaConf.load(os.path.join(model_dir, name))
        kind = file.get("model", file).get("kind", "causal_lm")  # package _global_ files hold a model: section
        if kind == "auto":  # +model=hf: its keys come from a model's config (tests/test_model_hf.py)
            continue
        cfg = compose_config(["+alg=mend", f"+experiment={first_task[kind]}", f"+model={name[: -len('.yaml')]}"])
        validate_config(cfg, algs=ALGS, tasks=DATASETS)
    # every editor on SmolLM2 (the locate-then-edit editors on the blocks of its locate block, docs/locate_edit.md)
    for alg in ALGS:
        validate_config(compose_config([f"+alg={alg}", *BASE[1:]]), algs=ALGS, tasks=DATASETS)


@pytest.mark.parametrize("key, text", CASES, ids=[f"{k}={t if t != HUGE_INT else '1e30int'}" for k, t in CASES])
def test_sweep(base_cfg, key, text):
    value = OverridesParser.create().parse_override(f"{key}={text}").value()
    cfg = copy.deepcopy(base_cfg)
    try:
        OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException:
        # not a value of the key's type: refused while composing, as on the command line
        with pytest.raises(ConfigError) as e:
            compose_config(BASE + [f"{key}={text}"])
        assert_one_line_naming(str(e.value), key)
        assert (key, text) not in ACCEPTED
        return
    try:
        validate_config(cfg, algs=ALGS, tasks=DATASETS)
    except ConfigError as e:
        assert_one_line_naming(str(e), key)
        assert "expected" in str(e) or "must be" in str(e), str(e)
        assert (key, text) not in ACCEPTED, f"{key}={text} is listed as accepted but refused: {e}"
    else:
        assert (key, text) in ACCEPTED, f"{key}={text} is accepted: refuse it or say in ACCEPTED why it works"
        assert text not in ("nan", "inf", "-1") or (text == "-1" and key in SIGNED_KEYS)


def test_the_refusals_say_what_is_expected(base_cfg):
    def refusal(key, value):
        cfg = copy.deepcopy(base_cfg)
        OmegaConf.update(cfg, key, value, merge=True)
        with pytest.raises(ConfigError) as e:
            validate_config(cfg, algs=ALGS, tasks=DATASETS)
        return str(e.value)

    assert refusal("max_iters", 0) == "max_iters=0: expected an integer >= 1."
    assert refusal("mend.edit_lr", math.nan).startswith("mend.edit_lr=nan: expected a finite number in (0, 1000];")
    assert refusal("batch_size", 10**12).startswith("batch_size=1000000000000: expected an integer in [1, 65536];")
    assert refusal("max_time", math.inf) == "max_time=inf: expected a finite number > 0, or null (no limit)."
    assert "or null (a full-rank residual)" in refusal("ft.rank", 0)
    assert "that fits in 64 bits" in refusal("val_interval", 10**30)
    with pytest.raises(ConfigError, match=r"^Error merging override max_iters=nan: Value 'nan' .* Integer, full_key"):
        compose_config(BASE + ["max_iters=nan"])
    with pytest.raises(ConfigError, match=r"^alg has no value: set it with \+alg=<name>"):
        validate_config(compose_config([]), algs=ALGS, tasks=DATASETS)


# -- the accepted values work --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"cloc": 0.0, "cbase": 0.0, "grad_clip": 1e30, "max_time": 1e30, "mend.n_hidden": 0, "seed": 0},
        {"cedit": 0.0},
    ],
)
def test_accepted_edge_values_train(tmp_path, overrides):
    from algs.mend.editor import MEND
    from evaluation import train_and_evaluate
    from trainer import EditTrainer

    cfg = make_config(
        "llama",
        mend__lr=1e-3,
        accumulate_bs=1,
        max_iters=4,
        val_interval=4,
        val_steps=2,
        log_interval=2,
        **{"eval.final_steps": 2, "eval.compare_untrained": False},
        **overrides,
    )
    validate_config(cfg, algs=["mend"], tasks=["gen"])
    model = TINY["llama"][0]()
    trainer = EditTrainer(
        lambda: MEND(model, cfg), cfg, SyntheticEdits(16, seed=0), SyntheticEdits(8, seed=1), str(tmp_path)
    )
    report = train_and_evaluate(trainer)
    assert report["train"]["steps"] == 4 and report["train"]["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in report["results"].values())


def test_accepted_ft_values_edit():
    from algs.ft.editor import FT

    cfg = make_config(
        "llama",
        alg="ft",
        **{"ft.time_limit": 1e30, "ft.locality.enabled": True, "ft.locality.cedit": 0.0, "ft.max_edit_steps": 3},
    )
    validate_config(cfg, algs=ALGS, tasks=["gen"])
    editor = FT(TINY["llama"][0](), cfg)
    editor.attach_training_data(SyntheticEdits(16, seed=5))
    edited, info = editor.edit(next(SyntheticEdits(8, seed=4).edit_generator(2, n=1))["edit_inner"])
    assert info["ft/steps"] == 3
    assert all(torch.isfinite(w).all() for w in edited.weights.values())


@pytest.mark.parametrize("temperature", [0.0, 1e30])
def test_accepted_sample_temperatures_sample(temperature):
    from data_classes.sampling import sample_continuations

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    out = sample_continuations(tiny_gpt2(), tok, [[1, 2, 3], [4, 5]], n_tokens=3, temperature=temperature, seed=0)
    assert [len(ids) for ids in out] == [3, 3]


# -- the command line: exit status 2, one line, no traceback --------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("max_iters=0", "max_iters"),  # was a RuntimeError from deep inside the editor after training nothing
        ("mend.edit_lr=nan", "mend.edit_lr"),  # was a run of skipped steps ending in a table of NaN, exit 0
        ("batch_size=-1", "batch_size"),
        ("max_iters=nan", "max_iters"),  # Hydra's own refusal: several lines and exit status 1
        ("data.n_edits=1e30", "data.n_edits"),
    ],
)
def test_command_line_refusals_are_one_line_and_exit_2(workspace, override, key):  # noqa: F811
    proc = run_cli(workspace, override, run_dir=workspace["root"] / "sweep")
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert len(lines) == 1 and f"{key}=" in lines[0], out[-3000:]


@pytest.mark.parametrize(
    "override, closest",
    [
        ("+val_every=30", "val_interval"),  # Hydra's own hint said to add the '+', which then ran the key unread
        ("val_every=30", "val_interval"),
        ("+mend.lrr=1", "mend.lr"),
        ("+data.n_edit=3", "data.n_edits"),
        ("+mned.rank=3", "mend.rank"),  # a misspelt group: its last name is compared
    ],
)
def test_a_key_the_schema_does_not_declare_is_refused_with_or_without_plus(base_cfg, override, closest):
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError) as refused:
        check_command_line([*BASE, override])
    message = str(refused.value)
    assert_one_line_naming(message, key)
    assert f"Did you mean {closest}" in message, message
    assert "To append to your config use" not in message  # Hydra's misleading hint is gone


def test_a_composed_configuration_with_an_undeclared_key_is_refused_by_validate_config():
    """compose_config (scripts, tests) lets '+' add a key; validate_config refuses it with the key named."""
    cfg = compose_config([*BASE, "+eval.final_step=3"])
    assert cfg.eval.final_step == 3  # Hydra took it
    with pytest.raises(ConfigError, match=r"no key 'eval.final_step' .* Did you mean eval.final_steps"):
        validate_config(cfg, algs=ALGS, tasks=DATASETS)


def test_the_keys_below_a_free_form_mapping_are_not_refused():
    """model.arch is a mapping of the model's config.json sizes: any key below it is the model's, not the schema's."""
    cfg = compose_config(["+alg=mend", "+experiment=gen", "+model=llama2-7b"])
    assert cfg.model.arch and not unknown_keys(cfg)
    keys, free = schema_keys()
    assert "model.arch" in free and {"mend.rank", "ft.locality.cedit", "data.n_edits", "max_iters"} <= keys
    check_key("model.arch.hidden_size")
    with pytest.raises(ConfigError, match="model.hidden_size"):
        check_key("model.hidden_size")


def test_a_key_added_below_a_null_mapping_is_one_line_not_a_traceback():
    with pytest.raises(ConfigError, match=r"could not be applied .* set it in the model's YAML file"):
        check_command_line([*BASE, "+model.arch.hidden_size=8"])


def test_a_command_line_with_an_undeclared_key_exits_2_in_one_line(workspace):  # noqa: F811
    proc = run_cli(workspace, "+val_every=30", run_dir=workspace["root"] / "sweep")
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert len(lines) == 1 and "Did you mean val_interval" in lines[0], out[-3000:]


def test_a_command_line_without_an_editor_says_which_to_choose(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "run", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert len(out.strip().splitlines()) == 1 and "alg has no value: set it with +alg=<name>" in out, out


def test_a_configuration_saved_before_the_data_keys_were_declared_still_loads():
    """A checkpoint's configuration from before this schema: it holds eval.verbose (since removed) and lacks the
    data keys declared since; merged over the schema, it has every key the data classes read."""

    saved = OmegaConf.to_container(make_config("llama"))
    saved["eval"]["verbose"] = True
    for key in ("max_documents", "max_passages", "max_countries", "max_length"):
        del saved["data"][key]
    cfg = merge_saved_config(saved)
    assert "verbose" not in cfg.eval and cfg.data.max_passages == 1200 and cfg.data.max_length == 128
    assert saved["eval"]["verbose"] is True  # the saved dict itself is left as it was


def test_a_configuration_saved_with_the_old_key_names_moves_them_to_their_groups():
    """Checkpoints written before each editor's keys moved into its group hold MEND's rates at the top level and
    FT's rate as ft.edit_lr; read back, the values are those of the new keys."""

    saved = OmegaConf.to_container(make_config("llama"))
    for key in ("lr", "lr_lr", "edit_lr"):
        del saved["mend"][key]
    del saved["ft"]["lr"]
    saved.update(lr=3e-6, lr_lr=2e-5, edit_lr=7e-4)
    saved["ft"]["edit_lr"] = 4e-5
    cfg = merge_saved_config(saved)
    assert (cfg.mend.lr, cfg.mend.lr_lr, cfg.mend.edit_lr, cfg.ft.lr) == (3e-6, 2e-5, 7e-4, 4e-5)
    assert "lr" not in cfg and "edit_lr" not in cfg.ft
    # resuming such a run with the same settings under the new names changes nothing
    same = make_config("llama", mend__lr=3e-6, mend__lr_lr=2e-5, mend__edit_lr=7e-4, ft__lr=4e-5)
    assert changed_settings({"config": saved}, same) == []
    assert changed_settings({"config": saved}, make_config("llama")) == [
        "ft.lr: 4e-05 -> 5e-06",
        "mend.edit_lr: 0.0007 -> 0.0001",
        "mend.lr: 3e-06 -> 1e-06",
        "mend.lr_lr: 2e-05 -> 0.0001",
    ]
    # a saved config that already has the new key keeps it
    saved = OmegaConf.to_container(make_config("llama", mend__lr=5e-5))
    saved["lr"] = 1.0
    assert merge_saved_config(saved).mend.lr == 5e-5
