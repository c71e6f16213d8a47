"""The editor contract for MEND and the baselines (EFK, ENN, FT, FT+KL), and each baseline's own behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, SyntheticEdits, make_config
from test_run import run_cli, workspace  # noqa: F401  (the module-scoped CLI workspace fixture)

from algs import ALGS, editor_class
from algs.efk.editor import EFK
from algs.enn.editor import ENN
from algs.ft.editor import FT
from algs.mend.editor import MEND
from config_schema import ConfigError, validate_config
from evaluation import train_and_evaluate
from trainer import EditTrainer

SMALL_EFK = {"efk.lstm_hidden": 16, "efk.condition_dim": 16, "efk.hidden_dim": 16}
# name -> (class, config overrides): every editor of the comparison, in its default form
EDITORS = {
    "mend": (MEND, {}),
    "efk": (EFK, SMALL_EFK),
    "enn": (ENN, {"train_base": True}),
    "ft": (FT, {"ft.lr": 1e-3}),
    "ft+kl": (FT, {"ft.lr": 1e-3, "ft.locality.enabled": True, "ft.locality.batch_size": 2}),
}


def make_editor(name: str, model, arch: str = "llama", train_set=None, **overrides):
    cls, base = EDITORS[name]
    cfg = make_config(arch, alg=cls.__name__.lower(), **{**base, **overrides})
    editor = cls(model, cfg)
    editor.attach_training_data(train_set if train_set is not None else SyntheticEdits(32, seed=5))
    return editor


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_editor_is_registered_and_has_a_config():
    assert set(ALGS) == {"mend", "efk", "enn", "ft", "ultraedit", "malmen", "rledit", "rome", "memit", "alphaedit"}
    locate = {"rome", "memit", "alphaedit"}  # they write to MLP output projections only (docs/locate_edit.md)
    for name in ALGS:
        cfg = make_config("llama", alg=name)
        if name in locate:
            cfg.model.inner_params = [p for p in cfg.model.inner_params if p.endswith("down_proj.weight")]
        validate_config(cfg, algs=ALGS, tasks=["gen"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("n_edits", [1, 3])
@pytest.mark.parametrize("name", list(EDITORS))
def test_edit_changes_only_inner_params_and_never_the_base_model(name, n_edits, arch):
    build, inner, _ = TINY[arch]
    model = build()
    before = _snapshot(model)
    editor = make_editor(name, model, arch, **{"data.n_edits": n_edits})
    editor.train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (n_edits, 10), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # a 4-token target after a 6-token prompt
    edit = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    batch = {"edit_inner": edit, "cond": edit}
    edited, info = editor.edit(batch["edit_inner"], batch["cond"])

    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "the base model's weights changed"
    assert all(not p.requires_grad for p in model.parameters())
    state = edited.edited_state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert changed == set(inner), changed
    for k in inner:
        assert state[k].shape == before[k].shape and state[k].dtype == before[k].dtype
    # the edited model runs, and differs from the base model on the edit input
    with torch.no_grad():
        logits = edited(input_ids=batch["edit_inner"]["input_ids"])
        base_logits = model(input_ids=batch["edit_inner"]["input_ids"]).logits
    assert logits.shape == base_logits.shape and not torch.allclose(logits, base_logits)
    assert "loss/edit_inner" in info


def _train(name, model, tmp_path, steps, **overrides):
    cls, base = EDITORS[name]
    settings = {
        "alg": cls.__name__.lower(),
        "mend.lr": 1e-3,
        "mend.lr_lr": 1e-2,
        "accumulate_bs": 1,
        "max_iters": steps,
        "val_interval": max(steps, 1),
        "val_steps": 32,
        "log_interval": 1000,
        "save": False,
        "eval.final_steps": 32,
        **base,
        **overrides,
    }
    cfg = make_config("llama", **settings)
    train, val = SyntheticEdits(128, seed=0), SyntheticEdits(32, seed=1)

    def factory():
        editor = cls(model, cfg)
        editor.attach_training_data(train)
        return editor

    torch.manual_seed(0)
    return train_and_evaluate(EditTrainer(factory, cfg, train, val, str(tmp_path)))


# The rates are not the defaults (mend.lr 1e-6, efk.lr 1e-5, enn.lr 1e-5): Adam moves each weight by about lr per
# step, so 60 steps at 1e-6 leave a tiny random editor where it started. How far below the untrained editor's
# loss/total_edit_val (0.4145 MEND, 0.4149 EFK and ENN) the trained one must end, measured over seeds 0, 1, 2: MEND
# 0.3656, 0.3628, 0.3645 (gap 0.049 to 0.052, seed spread 0.003); ENN 0.3582 each time (gap 0.057); EFK 0.4093,
# 0.4120, 0.4084 (gap 0.003 to 0.0065, no bigger than its spread: for EFK the margin says only that the training
# moved the right way). The rise of the edit log-probability at the same seeds: MEND 0.58, ENN 0.58, EFK 0.072,
# 0.034, 0.083.
BEATS_UNTRAINED = {"mend": 0.03, "efk": 0.001, "enn": 0.03}


@pytest.mark.parametrize(
    "name, overrides, steps, margin",
    [
        ("mend", {}, 60, 0.5),
        # EFK's outer-product updates start near zero and grow slowly (softmax over a row of the weight)
        ("efk", {"efk.lr": 3e-2}, 200, 0.02),
        ("enn", {"enn.lr": 1e-4, "enn.lr_lr": 5e-2, "enn.edit_lr": 1e-4}, 60, 0.5),
        ("ft", {"eval_only": True}, 0, 0.2),  # FT stops once the target is the greedy prediction
        ("ft+kl", {"eval_only": True}, 0, 0.2),
    ],
)
def test_edits_lower_the_edit_loss_after_a_short_training(name, overrides, steps, margin, tmp_path):
    """Learned editors: a short seeded training; FT and FT+KL need none. Measured on 32 held-out edits."""
    build, _, _ = TINY["llama"]
    model = build()
    report = _train(name, model, tmp_path, steps=max(steps, 1), **overrides)
    res = report["results"]
    assert res["edit/log_prob_val"] > res["edit/log_prob_pre_val"] + margin, res
    if name.startswith("ft"):
        assert res["edit/acc_val"] > res["edit/acc_pre_val"] + 0.5, res
        assert report["train"]["steps"] == 0 and "untrained" not in report
    else:
        assert report["train"]["steps"] == steps
        # the trained editor does better on the training objective than the same editor untrained
        assert res["loss/total_edit_val"] < report["untrained"]["loss/total_edit_val"] - BEATS_UNTRAINED[name], report


def test_efk_reads_the_embeddings_named_by_the_model_config():
    build, _, _ = TINY["gpt2"]
    model = build()
    editor = make_editor("efk", model, "gpt2", **{"model.embedding_module": "transformer.wte"})
    emb = editor.editor["condition"].embedding.weight
    assert torch.equal(emb, model.transformer.wte.weight)
    assert emb.data_ptr() != model.transformer.wte.weight.data_ptr()  # a trainable copy, not the model's own
    with pytest.raises(ValueError, match="model.embedding_module='transformer.nope'"):
        make_editor("efk", model, "gpt2", **{"model.embedding_module": "transformer.nope"})


def test_efk_condition_encoder_ignores_padding_on_either_side():
    build, _, _ = TINY["llama"]
    editor = make_editor("efk", build())
    enc = editor.editor["condition"]
    ids = torch.tensor([[5, 6, 7, 8]])
    right = torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    left = torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
    ref = enc(ids, torch.ones_like(ids))
    torch.testing.assert_close(enc(*right), ref)
    torch.testing.assert_close(enc(*left), ref)


# ------------------------------------------------------------------------------------------------
# ENN: the gradient through the inner step
# ------------------------------------------------------------------------------------------------
def _enn_outer_loss(editor, batch):
    edited, _ = editor.edit(batch["edit_inner"])
    return edited.edit_loss_fn(
        edited(**{k: v for k, v in batch["edit_outer"].items() if k != "labels"}), batch["edit_outer"]["labels"]
    )["nll"]


@pytest.mark.parametrize("n_edit_steps", [1, 2])
def test_enn_second_order_gradient_matches_finite_differences(n_edit_steps):
    # GPT-2 in float64 (Llama's RMSNorm computes in float32, too coarse for finite differences)
    build, inner, _ = TINY["gpt2"]
    model = build().double()
    editor = make_editor("enn", model, "gpt2", **{"enn.edit_lr": 0.5, "enn.n_edit_steps": n_edit_steps}).double()
    editor.train()
    batch = next(SyntheticEdits(8, seed=2).edit_generator(2, n=1))
    loss = _enn_outer_loss(editor, batch)
    w = editor.base_weights[inner[0].replace(".", "#")]
    g_w, g_lr = torch.autograd.grad(loss, [w, editor.edit_lrs])

    eps = 1e-6
    idx = [(0, 0), (3, 5), (17, 2), (31, 100)]
    with torch.no_grad():
        for i, j in idx:
            w[i, j] += eps
            up = _enn_outer_loss(editor, batch).item()
            w[i, j] -= 2 * eps
            down = _enn_outer_loss(editor, batch).item()
            w[i, j] += eps
            assert g_w[i, j].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)
        for k in range(len(inner)):
            editor.edit_lrs[k] += eps
            up = _enn_outer_loss(editor, batch).item()
            editor.edit_lrs[k] -= 2 * eps
            down = _enn_outer_loss(editor, batch).item()
            editor.edit_lrs[k] += eps
            assert g_lr[k].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)


def test_enn_first_order_drops_the_second_order_term():
    """With one inner step, the first-order gradient w.r.t. a base weight is the outer gradient at the edited weight."""
    build, inner, _ = TINY["gpt2"]
    model = build().double()
    batch = next(SyntheticEdits(8, seed=2).edit_generator(2, n=1))
    grads = {}
    for first_order in (False, True):
        editor = make_editor("enn", model, "gpt2", **{"enn.edit_lr": 0.5, "enn.first_order": first_order}).double()
        editor.train()
        edited, _ = editor.edit(batch["edit_inner"])
        key = inner[0].replace(".", "#")
        # the outer gradient taken at the edited weights, as constants
        leaves = {n: edited.weights[n].detach().requires_grad_(True) for n in inner}
        at_edited = torch.autograd.grad(edited.loss_with(batch["edit_outer"], leaves)["nll"], leaves[inner[0]])[0]
        loss = edited.loss_with(batch["edit_outer"], {})["nll"]
        grads[first_order] = (torch.autograd.grad(loss, editor.base_weights[key])[0], at_edited)
    first, at_edited = grads[True]
    torch.testing.assert_close(first, at_edited)
    second, _ = grads[False]
    assert (second - first).norm() > 1e-3 * first.norm()  # the Hessian term is really there without first_order


def test_enn_second_order_runs_through_fused_attention():
    """Fused SDPA kernels have no double backward; ENN's inner forward must not use them when differentiated twice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    build, inner, _ = TINY["llama"]
    model = build()
    lower = [n.replace("layers.1", "layers.0") for n in inner]  # an attention layer above the edited weights
    editor = make_editor("enn", model, **{"model.inner_params": lower})
    editor.train()
    batch = next(SyntheticEdits(8, seed=2).edit_generator(2, n=1))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # what CPU inference picks for real models
        edited, _ = editor.edit(batch["edit_inner"])
        loss = edited.loss_with(batch["edit_outer"], {})["nll"]
        grads = torch.autograd.grad(loss, list(editor.base_weights.parameters()))
    assert all(torch.isfinite(g).all() and g.norm() > 0 for g in grads)


def test_enn_train_base_trains_every_base_parameter_with_a_kl_to_the_original_model():
    build, inner, _ = TINY["llama"]
    model = build()
    editor = make_editor("enn", model)
    # As the original's outer_parameters(): every parameter of the base model (one trainable copy; the model object
    # itself is not copied) plus the step sizes.
    names = {n.replace("#", ".") for n in editor.base_weights.keys()}
    assert names == {n for n, _ in model.named_parameters()}
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in editor.outer_parameters()) == n_model + len(inner)
    loc = {"input_ids": torch.randint(1, 64, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    assert editor.base_loss(loc, loc["attention_mask"]).item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        editor.base_weights["model#norm#weight"].add_(0.5)  # a parameter that is not edited
    kl = editor.base_loss(loc, loc["attention_mask"])
    assert kl.item() > 1e-4 and kl.requires_grad
    assert make_editor("enn", model, train_base=False).base_loss(loc, None) is None


@pytest.mark.parametrize("step_sizes, rate", [("separate", "enn.lr_lr"), ("original", "enn.lr")])
def test_enn_step_sizes_train_at_lr_lr_or_as_the_original_at_lr(tmp_path, step_sizes, rate):
    """The original code puts ENN's edit_lrs in the main optimiser at lr (1e-5) and its step-size optimiser never
    moves them (the main optimiser's zero_grad runs first); enn.step_sizes=original trains them so."""
    build, _, _ = TINY["llama"]
    model = build()
    rates = {"enn.lr": 1e-5, "enn.lr_lr": 1e-3}
    settings = {**rates, "enn.step_sizes": step_sizes, "train_base": True, "accumulate_bs": 1}
    cfg = make_config("llama", alg="enn", **settings)
    trainer = EditTrainer(lambda: ENN(model, cfg), cfg, SyntheticEdits(8), SyntheticEdits(4, seed=1), str(tmp_path))
    alone = trainer.lr_opt is not None and [p for g in trainer.lr_opt.param_groups for p in g["params"]]
    assert alone == ([trainer.editor.edit_lrs] if step_sizes == "separate" else False)
    assert any(p is trainer.editor.edit_lrs for g in trainer.opt.param_groups for p in g["params"]) == (not alone)
    before = trainer.editor.edit_lrs.detach().clone()
    trainer.edit_step(next(trainer._train_batches()), training=True)
    assert trainer.editor.edit_lrs.grad is not None and trainer.editor.edit_lrs.grad.abs().min() > 1e-6
    trainer._optimizer_step()
    # Adam's first step moves each step size by its rate (lr * g / (|g| + eps))
    moved = (trainer.editor.edit_lrs.detach() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, rates[rate]), rtol=1e-3, atol=0)


def test_enn_step_sizes_setting_is_checked():
    """Refused before anything loads (validate_config runs ENN's settings check) and by an editor built in code."""
    cfg = make_config("llama", alg="enn", **{"enn.step_sizes": "paper"})
    message = r"enn.step_sizes='paper': expected 'separate' .* or 'original'"
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, algs=ALGS, tasks=[cfg.task])
    with pytest.raises(ConfigError, match=message):
        ENN(TINY["llama"][0](), cfg)


# ------------------------------------------------------------------------------------------------
# FT: when it stops
# ------------------------------------------------------------------------------------------------
def _ft_edit(model, batch, **overrides):
    editor = make_editor("ft", model, **{"ft.opt": "Adam", "ft.lr": 3e-3, **overrides})
    edited, info = editor.edit(batch)
    return edited, info, editor.loss_with(batch, edited.weights)["acc"].item()


def test_ft_stops_as_soon_as_the_target_is_the_greedy_prediction():
    build, _, _ = TINY["llama"]
    model = build()
    batch = next(SyntheticEdits(8, seed=4).edit_generator(2, n=1))["edit_inner"]
    edited, info, acc = _ft_edit(model, batch)
    k = edited.steps_taken
    assert acc == 1.0 and info["ft/success_inner"] == 1.0 and 1 <= k < 100
    # one step fewer, the same (deterministic) trajectory has not reached the target yet
    _, _, acc_before = _ft_edit(model, batch, **{"ft.max_edit_steps": k - 1})
    assert acc_before < 1.0


def test_ft_never_exceeds_max_edit_steps_and_leaves_a_solved_edit_alone():
    build, _, _ = TINY["llama"]
    model = build()
    batch = next(SyntheticEdits(8, seed=4).edit_generator(2, n=1))["edit_inner"]
    edited, info, acc = _ft_edit(model, batch, **{"ft.lr": 1e-9, "ft.max_edit_steps": 7})
    assert edited.steps_taken == 7 and info["ft/steps"] == 7.0 and acc < 1.0
    # a target that already is the greedy prediction takes no step and changes nothing
    with torch.no_grad():
        greedy = model(input_ids=batch["input_ids"]).logits.argmax(-1)
    solved = dict(batch, labels=torch.full_like(batch["labels"], -100))
    solved["labels"][:, -1] = greedy[:, -2]
    edited, _, acc = _ft_edit(model, solved)
    assert edited.steps_taken == 0 and acc == 1.0
    assert all(torch.equal(edited.weights[n], model.get_parameter(n)) for n in edited.weights)


def test_ft_kl_draws_locality_from_the_training_set_and_needs_it():
    build, _, _ = TINY["llama"]
    model = build()
    batch = next(SyntheticEdits(8, seed=4).edit_generator(2, n=1))["edit_inner"]
    cls, base = EDITORS["ft+kl"]
    editor = cls(model, make_config("llama", alg="ft", **base))
    with pytest.raises(RuntimeError, match="attach_training_data"):
        editor.edit(batch)
    drawn = []

    class Recording(SyntheticEdits):
        def edit_generator(self, batch_size, n=None):
            for b in super().edit_generator(batch_size, n):
                drawn.append(b["loc"]["input_ids"].shape)
                yield b

    editor.attach_training_data(Recording(32, seed=5))
    edited, info = editor.edit(batch)
    assert len(drawn) == info["ft/steps"] >= 1
    assert all(shape[0] == 2 for shape in drawn)  # ft.locality.batch_size examples per step


def test_baseline_settings_are_checked():
    with pytest.raises(ConfigError, match="train_base"):
        editor_class("mend").check_config(make_config("llama", alg="mend", train_base=True))
    editor_class("enn").check_config(make_config("llama", alg="enn", train_base=True))
    with pytest.raises(ConfigError, match="enn.n_edit_steps"):
        validate_config(make_config("llama", alg="enn", **{"enn.n_edit_steps": 0}), algs=ALGS, tasks=["gen"])
    # FT needs no archive to evaluate; the learned editors do
    editor_class("ft").check_config(make_config("llama", alg="ft", eval_only=True))
    with pytest.raises(ConfigError, match="archive"):
        editor_class("efk").check_config(make_config("llama", alg="efk", eval_only=True))
    with pytest.raises(ConfigError, match="ft.opt"):
        FT(TINY["llama"][0](), make_config("llama", alg="ft", **{"ft.opt": "Adamm"}))


# ------------------------------------------------------------------------------------------------
# The command line, for every editor
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "alg, extra",
    [
        ("efk", ["efk.lstm_hidden=16", "efk.condition_dim=16", "efk.hidden_dim=16"]),
        ("enn", []),
        ("ft", ["ft.max_edit_steps=5"]),
        ("ft", ["ft.max_edit_steps=5", "ft.locality.enabled=true"]),
    ],
)
def test_every_editor_runs_from_the_command_line(workspace, alg, extra, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    common = ["max_iters=4", "val_interval=4", "val_steps=3", "log_interval=2", "accumulate_bs=2"]
    proc = run_cli(workspace, *common, *extra, run_dir=run_dir, alg=alg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "results.json").read_text())
    assert report["config"]["alg"] == alg
    assert report["train"]["steps"] == (0 if alg == "ft" else 4)
    assert report["results"]["eval_time/n_edits"] == 3
    for key in ("edit/acc_val", "perplexity/drawdown_val", "time/edit_val"):
        assert key in report["results"], key
