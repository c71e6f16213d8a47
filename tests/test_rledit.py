"""RLEdit (algs/rledit): one training sequence against the original code number for number, what its meta-step
differentiates (through the current update only, the earlier ones applied for real as constants), its discount, its
penalty, and as an editor of this project (configuration, training, checkpoints, resuming, lifelong statistics).

``tests/golden/rledit-gpt2.*`` holds what the original code (zhrli324/RLEdit, run by ``tests/golden/make_rledit.py``)
computed over one sequence of 3 batches of 4 edits (``back_depth`` 2, ``time_decay`` 0.5) on the tiny random GPT-2 of
the MEND golden files, from a network with seeded random parameters: each step's least-squares update and the
normalisation's statistics it used, and the network's gradients at the sequence's one optimiser step (clipped after
every step, as the original's, and with no clipping: the plain sum). The editor here, given the same network and
examples, must give the same numbers to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, SyntheticEdits, make_config
from safetensors.torch import load_file
from test_run import run_cli
from test_run import workspace as workspace  # noqa: F401  (the fixture: a tiny GPT-2 on disk and a gen data set)
from test_ultraedit import golden_model

import utils
from algs import ALGS, check_shapes
from algs.rledit import RLEditConfig
from algs.rledit.editor import RLEdit
from algs.ultraedit.editor import longest_first_chunks
from config_schema import ModelConfig, compose_config, config_for, validate_config
from data_classes import DATASETS
from data_classes.batches import pad_rows, prompt_target_batch
from edit import Editor
from losses import kl_loc_loss
from meta_loss import StepContext
from trainer import EditTrainer

GOLDEN = Path(__file__).parent / "golden"
META = json.loads((GOLDEN / "rledit-gpt2.json").read_text())
GOLD = load_file(str(GOLDEN / "rledit-gpt2.safetensors"))


# ------------------------------------------------------------------------------------------------
# The original's numbers
# ------------------------------------------------------------------------------------------------
def golden_batches() -> list:
    """The golden sequence as batches of this project's layout (one unrelated input per edit, every position
    scored, as the original's ``util.kl_div`` scores them)."""
    edits, n = META["edits"], META["n_edits"]
    batches = []
    for b in range(META["seq_len"]):
        rows = edits[b * n : (b + 1) * n]
        loc_ids, loc_mask = pad_rows([e["unrelated"] for e in rows], 0)
        batches.append(
            {
                "edit_inner": prompt_target_batch([(e["prompt"], e["target"]) for e in rows], pad_id=0),
                "edit_outer": prompt_target_batch([(e["rephrase"], e["target"]) for e in rows], pad_id=0),
                "loc": {
                    "input_ids": loc_ids,
                    "attention_mask": loc_mask,
                    "labels": torch.where(loc_mask.bool(), loc_ids, -100),
                },
            }
        )
    return batches


def golden_setup(**overrides) -> RLEdit:
    """Our editor on the golden model with the golden network loaded, at the golden run's settings."""
    model, cls = golden_model("gpt2")
    settings = {
        "rledit.rank": META["rank"],
        "rledit.n_blocks": META["n_blocks"],
        "rledit.chunk_size": META["chunk_size"],
        "rledit.net_chunk": META["net_chunk"],
        "rledit.seq_len": META["seq_len"],
        "rledit.back_depth": META["back_depth"],
        "rledit.time_decay": META["time_decay"],
        "rledit.reg_coef": META["reg_coef"],
        "cedit": 1.0,
        "cloc": META["loc_coef"],
        "grad_clip": META["max_grad_norm"],
    }
    cfg = config_for(
        ModelConfig(name="golden-gpt2", class_name=cls, inner_params=META["inner_params"]),
        "gen",
        "rledit",
        **{**settings, **overrides},
    )
    editor = RLEdit(model, cfg)
    state = {}
    for key, value in GOLD.items():  # "(32, 128).blocks.0.A" -> "net.32x128.blocks.0.A"
        if key.startswith("init."):
            state["net." + net_key(key[len("init.") :])] = value
    missing, unexpected = editor.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("count", "mean", "m2")) for k in missing), (missing, unexpected)
    return editor


def net_key(original: str) -> str:
    """The original's parameter name (its network keyed by the shape's tuple) as ours: "(32, 128).x" -> "32x128.x"."""
    shape, rest = original.split(")", 1)
    return "x".join(shape.strip("(").replace(" ", "").split(",")) + rest


def meta_gradients(editor: RLEdit, batches: list) -> dict:
    """The network's gradients from one training sequence (``meta_loss`` then ``meta_backward``), as the trainer's
    backward receives them."""
    editor.train()
    params = dict(editor.named_parameters())
    grads = {}

    def backward(loss):
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[name] = g

    losses = editor.meta_loss(batches, StepContext(training=True))
    editor.meta_backward(losses, backward)
    return grads, losses


def gradient_error(grads: dict, prefix: str) -> float:
    """The largest error of our gradients against the golden ones under ``prefix`` (relative to their size)."""
    worst, checked = 0.0, 0
    for key, theirs in GOLD.items():
        if key.startswith(prefix + "."):
            ours = grads["net." + net_key(key[len(prefix) + 1 :])]
            worst = max(worst, ((ours - theirs).norm() / theirs.norm()).item())
            checked += 1
    assert checked == len(grads)
    return worst


def test_the_original_code_gives_the_same_updates_along_the_sequence_and_statistics():
    """Each batch edited on the model the earlier batches edited: the same least-squares updates step after step,
    and the same statistics (updated by every edit)."""
    editor = golden_setup()
    editor.train()
    current = editor
    for t, batch in enumerate(golden_batches()):
        edited, _ = current.edit(batch["edit_inner"])
        for n in META["inner_params"]:
            ours = edited.weights[n] - current.current_weight(n)
            theirs = GOLD[f"shift.{t}.{n[: -len('.weight')]}"]  # GPT-2's Conv1D: the update in the weight's layout
            assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4, (t, n)
        for key, net in editor.net.items():
            norm, k = net.normalizer, "(" + ", ".join(key.split("x")) + ")"
            for ours, theirs in ((norm.count, "n"), (norm.mean, "mean"), (norm.m2, "var")):
                theirs = GOLD[f"stats.{t}.{k}.{theirs}"]
                assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5, (t, key)
        current = edited


@pytest.mark.parametrize("clipped", [True, False])
def test_the_original_code_gives_the_same_meta_gradients_over_the_sequence(clipped):
    """The network's gradient at the sequence's optimiser step: clipped after each step as the original clips it,
    and with no clipping (the plain sum, where the first steps count as much as the last). Against the original
    with its locality loss back-propagated through the edited weights (make_rledit.py, FIX_LOCALITY_BACKWARD)."""
    editor = golden_setup(**({} if clipped else {"grad_clip": 1e30}))
    grads, _ = meta_gradients(editor, golden_batches())
    assert gradient_error(grads, "grad" if clipped else "grad_unclipped") < 1e-4


def test_the_original_code_as_it_is_differs_by_its_locality_backward_only():
    """The original as it is back-propagates the locality loss after taking the step's update out of the weights
    (docs/rledit.md, "Differences"): its gradient differs from ours by less than the locality term's share (about
    3% here: the gradient without it is 3e-2 away), and the corrected code's agrees to float32 rounding."""
    grads, _ = meta_gradients(golden_setup(grad_clip=1e30), golden_batches())
    assert 1e-4 < gradient_error(grads, "grad_unclipped_as_is") < 2e-3


def test_the_logged_losses_are_the_originals_and_hold_the_penalty():
    """The penalty reg_coef * |dW_t|^2 of the last step, from the original's updates (the original adds it to the loss
    it back-propagates, where it is a constant), in the logged total; and the sequence's loss: over the steps, the
    window's rephrasing and locality losses (the original logs their means over the window, ``gen_loss`` and
    ``loc_loss``) and the penalties. Undiscounted here (time_decay 1), so that the logged means give the sum."""
    reg = [
        META["reg_coef"] * sum(GOLD[k].pow(2).sum().item() for k in GOLD if k.startswith(f"shift.{t}."))
        for t in range(META["seq_len"])
    ]
    _, losses = meta_gradients(golden_setup(), golden_batches())
    assert losses.info["rledit/reg"] == pytest.approx(reg[-1], rel=1e-4)
    assert losses.total.item() == pytest.approx(losses.total_edit.item() + reg[-1], rel=1e-6)
    _, plain = meta_gradients(golden_setup(**{"rledit.time_decay": 1.0}), golden_batches())
    windows = [min(t + 1, META["back_depth"]) for t in range(META["seq_len"])]
    logged = sum(n * (x["gen_loss"] + x["loc_loss"]) for n, x in zip(windows, META["logged"]))
    assert plain.info["loss/sequence"] == pytest.approx(logged + sum(reg), rel=1e-5)


@pytest.mark.parametrize("change", ["no discount", "no window", "no locality", "each batch on the base model"])
def test_a_changed_sequence_step_is_caught_by_the_golden_values(change, monkeypatch):
    """The comparison above is sharp enough to see each of these changes, by orders of magnitude."""
    overrides = {"grad_clip": 1e30}
    if change == "no discount":
        overrides["rledit.time_decay"] = 1.0
    elif change == "no window":
        overrides["rledit.back_depth"] = 1  # each step's loss on its own batch only
    elif change == "no locality":
        overrides["cloc"] = 0.0
    elif change == "each batch on the base model":  # the earlier updates not carried to the next batch
        monkeypatch.setattr(RLEdit, "_applied", lambda self, current, leaves: self)
    grads, _ = meta_gradients(golden_setup(**overrides), golden_batches())
    assert gradient_error(grads, "grad_unclipped") > 1e-2, change


# ------------------------------------------------------------------------------------------------
# What the meta-step differentiates: plain back-propagation over the sequence
# ------------------------------------------------------------------------------------------------
def naive_sequence_gradients(editor: RLEdit, batches: list, through_earlier: bool) -> dict:
    """The sequence's meta-gradient by plain autograd (no clipping): at each step the solve differentiated by
    autograd, every chunk's graph kept, and the step's loss (the discounted window, plus the penalty when it is
    back-propagated) differentiated into the network. ``through_earlier``: the weights a step starts from keep the
    graphs of the earlier updates, so that its loss also trains the network through them (not what RLEdit does)."""
    editor.train()
    settings, cfg = editor.settings, editor.config
    size, decay, depth = int(settings.chunk_size), float(settings.time_decay), int(settings.back_depth)
    params = dict(editor.named_parameters())
    total = {}
    weights = {n: editor.model.get_parameter(n) for n in editor.inner_params}
    for t, batch in enumerate(batches):
        current = editor.with_weights({n: w.detach() for n, w in weights.items()})
        keys, grads, _ = current._factors(batch["edit_inner"])
        new, penalty = {}, 0.0
        for name in editor.inner_params:
            net, idx = editor._net(name)
            k = keys[name]
            values = net.shifts(k, grads[name], idx)
            delta = torch.linalg.solve(k.T @ k + net.lamda(idx).exp() * torch.eye(k.shape[1]), k.T @ values)
            start = weights[name] if through_earlier else weights[name].detach()
            new[name] = start + (delta if editor.layout[name][0] else delta.T)
            penalty = penalty + settings.reg_coef * delta.pow(2).sum()
        edited = editor.with_weights(new)
        loss = penalty if settings.reg_gradient else 0.0
        for j, b in enumerate(batches[max(0, t + 1 - depth) : t + 1][::-1]):
            outer, loc = b["edit_outer"], b["loc"]
            for rows in longest_first_chunks(outer["attention_mask"], size):
                chunk = {k: v[rows] for k, v in outer.items()}
                loss = loss + decay**j * cfg.cedit * edited.loss_with(chunk, {})["nll"]
            for rows in longest_first_chunks(loc["attention_mask"], size):
                inputs = {"input_ids": loc["input_ids"][rows], "attention_mask": loc["attention_mask"][rows]}
                with torch.no_grad():
                    pre = current(**inputs)
                loss = loss + decay**j * cfg.cloc * kl_loc_loss(pre, edited(**inputs), inputs["attention_mask"])
        step = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=through_earlier)
        for name, g in zip(params, step):
            if g is not None:
                total[name] = total[name] + g if name in total else g
        weights = new
    return total


def random_editor(arch: str, **overrides) -> RLEdit:
    """RLEdit on a tiny model with a network that is not the identity (the golden one for GPT-2's Conv1D layers; a
    seeded random one for Llama's nn.Linear layers, whose updates are stored transposed)."""
    if arch == "golden-gpt2":
        return golden_setup(**overrides)
    settings = {"rledit.rank": 4, "rledit.chunk_size": 2, "rledit.net_chunk": 5, "rledit.edit_lr": 1e-3}
    settings.update({"rledit.seq_len": 3, "rledit.back_depth": 2, "rledit.time_decay": 0.5, "cedit": 1.0})
    torch.manual_seed(0)
    editor = RLEdit(TINY[arch][0](), make_config(arch, alg="rledit", **{**settings, **overrides}))
    with torch.no_grad():
        for p in editor.net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return editor


def sequence_batches(arch: str) -> list:
    if arch == "golden-gpt2":
        return golden_batches()
    return list(SyntheticEdits(24, seed=2).edit_generator(6, n=3))  # 3 batches of 2 edits (data.n_edits) + 4 loc


def relative_error(ours: dict, theirs: dict, ridges: bool = True) -> float:
    """The largest error of our gradients (relative to the size of theirs), the ridges' included or not."""
    assert set(ours) == set(theirs)
    names = [n for n in ours if ridges or not n.endswith("lamda.weight")]
    return max(((ours[n] - theirs[n]).norm() / theirs[n].norm()).item() for n in names)


def assert_plain_back_propagation(ours: dict, naive: dict) -> None:
    """To float32 rounding: ~1e-5; the ridges' gradients, sums that cancel to a hundredth of their terms, ~4e-3."""
    assert relative_error(ours, naive, ridges=False) < 2e-3
    assert relative_error(ours, naive) < 2e-2


@pytest.mark.parametrize("arch", ["golden-gpt2", "llama"])
def test_the_meta_step_differentiates_through_the_current_update_only(arch):
    """The staged sequence step (each step's gradient taken through its solve by hand at once) is plain
    back-propagation of the discounted window through the step's own update, the earlier updates constants; the
    gradient that also flows through the earlier updates is far from it."""
    overrides = {"grad_clip": 1e30, "data.n_edits": 2}
    ours, _ = meta_gradients(random_editor(arch, **overrides), sequence_batches(arch))
    detached = naive_sequence_gradients(random_editor(arch, **overrides), sequence_batches(arch), False)
    through = naive_sequence_gradients(random_editor(arch, **overrides), sequence_batches(arch), True)
    assert_plain_back_propagation(ours, detached)
    assert relative_error(ours, through) > 1e-2


@pytest.mark.parametrize("arch", ["golden-gpt2", "llama"])
def test_the_penalty_changes_no_gradient_as_in_the_original_unless_asked(arch):
    """rledit.reg_gradient=false (the original): the penalty's weight changes nothing the network is trained by;
    true: its gradient through the solve is added, as plain back-propagation of the penalty gives it."""
    overrides = {"grad_clip": 1e30, "data.n_edits": 2}
    without, _ = meta_gradients(random_editor(arch, **overrides, **{"rledit.reg_coef": 0.0}), sequence_batches(arch))
    constant, _ = meta_gradients(random_editor(arch, **overrides, **{"rledit.reg_coef": 1.0}), sequence_batches(arch))
    for name in without:
        assert torch.equal(without[name], constant[name]), name
    asked = {**overrides, "rledit.reg_coef": 1.0, "rledit.reg_gradient": True}
    ours, _ = meta_gradients(random_editor(arch, **asked), sequence_batches(arch))
    naive = naive_sequence_gradients(random_editor(arch, **asked), sequence_batches(arch), False)
    assert_plain_back_propagation(ours, naive)
    assert relative_error(ours, without) > 1e-2


def test_a_decay_of_zero_counts_each_batch_alone():
    """time_decay 0 weighs the batches before the current one by 0 (0^0 = 1 for the current one): the gradient of
    back_depth 1."""
    zero, _ = meta_gradients(
        random_editor("llama", grad_clip=1e30, **{"rledit.time_decay": 0.0}), sequence_batches("llama")
    )
    alone, _ = meta_gradients(
        random_editor("llama", grad_clip=1e30, **{"rledit.back_depth": 1}), sequence_batches("llama")
    )
    assert relative_error(zero, alone) < 1e-6


# ------------------------------------------------------------------------------------------------
# As an editor of this project
# ------------------------------------------------------------------------------------------------
TRAIN_SETTINGS = {
    "rledit.rank": 4,
    "rledit.chunk_size": 2,
    "rledit.edit_lr": 1e-3,
    "rledit.seq_len": 2,
    "rledit.back_depth": 2,
    "accumulate_bs": 1,  # as config/alg/rledit.yaml
    "grad_clip": 1.0,
    "cedit": 1.0,
    "cloc": 0.6,
    "data.n_edits": 3,
    "batch_size": 6,
    "val_batch_size": 6,
    "max_iters": 3,
    "val_interval": 100,
    "val_steps": 2,
    "log_interval": 1,
    "eval.compare_untrained": False,
}


def make_trainer(model, run_dir, **overrides) -> EditTrainer:
    cfg = make_config("llama", alg="rledit", **{**TRAIN_SETTINGS, **overrides})
    utils.seed_everything(cfg.seed)
    return EditTrainer(
        lambda: RLEdit(model, cfg), cfg, SyntheticEdits(48, seed=0), SyntheticEdits(16, seed=1), str(run_dir)
    )


def test_it_trains_over_sequences_checkpoints_and_resumes_through_the_trainer(tmp_path):
    """Three training steps of two batches each through the unchanged trainer: six batches drawn, one optimiser
    step per sequence; the resumed run continues from last.pt with the same network and statistics."""
    model = TINY["llama"][0]()
    trainer = make_trainer(model, tmp_path / "a")
    assert trainer.editor.batches_per_step == 2
    before = [p.detach().clone() for p in trainer.editor.outer_parameters()]
    trainer.train()
    after = list(trainer.editor.outer_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(m.count.item() > 0 for m in trainer.editor.running_statistics().values())
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 3 and last["trainer"]["batches_drawn"] == 6
    assert trainer.opt.state_dict()["state"][0]["step"].item() == 3  # one Adam step per sequence
    resumed = make_trainer(model, tmp_path / "a", max_iters=4, resume=str(tmp_path / "a"))
    assert resumed.state.step == 3
    for a, b in zip(resumed.editor.state_dict().values(), trainer.editor.state_dict().values()):
        assert torch.equal(a, b)


def test_edits_update_the_statistics_and_validation_puts_them_back(tmp_path):
    """Every edit updates the normalisation, in training or not (the original's cache); the statistics are the
    editor's lifelong state, which validation leaves as it found it."""
    trainer = make_trainer(TINY["llama"][0](), tmp_path)
    editor = trainer.editor
    editor.eval()
    batch = next(SyntheticEdits(8, seed=3).edit_generator(4, n=1))
    state = editor.lifelong_state()
    editor.edit(batch["edit_inner"])
    assert all(m.count.item() > 0 for m in editor.running_statistics().values())
    editor.load_lifelong_state(state)
    assert all(torch.equal(v, editor.lifelong_state()[k]) for k, v in state.items())
    editor.edit(batch["edit_inner"])  # statistics to standardise with
    state = editor.lifelong_state()
    stats = trainer.validate(steps=2)
    assert stats["edit/acc_val"] >= 0.0 and math.isfinite(stats["loss/total_edit_val"])
    assert stats["eval_time/n_edits"] == 2 * 2 * 3  # 2 steps of sequences of 2 batches of 3 edits
    assert all(torch.equal(v, editor.lifelong_state()[k]) for k, v in state.items())


@pytest.mark.parametrize("experiment", ["gen", "counterfact"])
def test_the_shipped_config_composes_with_the_originals_values(experiment):
    """+alg=rledit composes with each causal-LM experiment and passes validation, with the original's values: the
    group's defaults (the settings' dataclass) and the keys outside it that config/alg/rledit.yaml sets."""
    cfg = compose_config(["+alg=rledit", f"+experiment={experiment}", "+model=smollm2"])
    validate_config(cfg, algs=ALGS, tasks=DATASETS)
    assert dict(cfg.rledit) == dataclasses.asdict(RLEditConfig())
    assert (cfg.rledit.seq_len, cfg.rledit.back_depth, cfg.rledit.time_decay, cfg.rledit.rank) == (400, 10, 0.95, 1024)
    assert (cfg.cedit, cfg.cloc, cfg.grad_clip, cfg.accumulate_bs) == (1.0, 0.6, 1.0, 1)


def test_a_rank_above_every_networks_width_is_warned_of():
    cfg = make_config("llama", alg="rledit", **{"rledit.rank": 200})
    shapes = {"a": (64, 32), "b": (32, 64)}
    (warning,) = check_shapes(cfg, shapes)
    assert warning.startswith("rledit.rank=200 is above the width of every RLEdit network of this model (at most 96")
    assert check_shapes(make_config("llama", alg="rledit", **{"rledit.rank": 96}), shapes) == []


def test_python_m_run_trains_it_and_python_m_edit_applies_a_sequence(workspace, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = run_cli(
        workspace,
        "max_iters=2", "val_interval=2", "val_steps=1", "log_interval=1", "data.n_edits=3", "batch_size=6",
        "val_batch_size=6", "rledit.rank=8", "rledit.chunk_size=2", "rledit.seq_len=2", "eval.final_steps=2",
        run_dir=run_dir, alg="rledit",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "results.json").read_text())
    assert report["config"]["alg"] == "rledit" and report["train"]["steps"] == 2
    editor = Editor.from_archive(str(run_dir), cache_dir=workspace["cache"])
    requests = [{"prompt": "The old museum", "target": "market square"}, {"prompt": "Winter", "target": "harbour"}]
    result = editor.apply(requests, mode="sequential")
    assert len(result.model.patches) == 2
