"""The work a training step skips (config ``speed.*``) changes nothing but the time: each fast path against the plain
one on the same editor and batch."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SyntheticEdits, make_config, tiny_gpt2, tiny_llama

from algs.enn.editor import ENN
from algs.mend.editor import MEND
from blocks import LowerBlocks
from trainer import EditTrainer
from utils import all_finite, model_inputs

# six edited weights in two blocks: four share the (32 -> 64) transform, two the (64 -> 32) one
LLAMA_6 = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in (1, 2) for p in ("gate", "up", "down")]
GPT2_INNER = ["transformer.h.2.mlp.c_fc.weight", "transformer.h.2.mlp.c_proj.weight"]


def _config(inner, **overrides):
    cfg = make_config("llama", **overrides)
    cfg.model.inner_params = inner
    return cfg


def _batch(seed=0):
    return next(SyntheticEdits(8, n_edits=1, seed=seed).edit_generator(3))


def _trained_mend(model, cfg, steps=3):
    """An editor whose normalisation has statistics and whose MLPs are not the identity."""
    editor = MEND(model, cfg)
    editor.train()
    with torch.no_grad():
        for p in editor.mend.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for seed in range(steps):
        editor.edit(_batch(seed)["edit_inner"])
    return editor


@pytest.mark.parametrize("training", [True, False])
def test_one_mlp_call_per_shape_gives_the_edit_of_one_call_per_weight(training):
    model = tiny_llama(n_layer=3)
    plain = _trained_mend(model, _config(LLAMA_6, **{"speed.batched_mlp": False}))
    fast = copy.deepcopy(plain)
    fast.config = _config(LLAMA_6, **{"speed.batched_mlp": True})
    assert len(plain.mend) == 2  # two shared transforms for six weights
    for editor in (plain, fast):
        editor.train(training)
    batch = _batch(5)
    edited = {}
    for name, editor in (("plain", plain), ("fast", fast)):
        out, _ = editor.edit(batch["edit_inner"])
        loss = out.loss_with(batch["edit_outer"], {})["nll"]
        grads = torch.autograd.grad(loss, list(editor.mend.parameters())) if training else None
        edited[name] = out, grads
    for n in LLAMA_6:
        torch.testing.assert_close(edited["fast"][0].weights[n], edited["plain"][0].weights[n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(edited["fast"][0].last_factors[n][0], edited["plain"][0].last_factors[n][0])
    # the running statistics were updated weight by weight in both
    for ma, mb in zip(plain.running_statistics().values(), fast.running_statistics().values()):
        for key in ("count", "mean", "m2"):
            torch.testing.assert_close(getattr(mb, key), getattr(ma, key), rtol=1e-6, atol=1e-8)
    if training:
        for g_fast, g_plain in zip(edited["fast"][1], edited["plain"][1]):
            torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-7)


def test_the_true_gradients_are_computed_only_for_the_diagnostics():
    model = tiny_llama(n_layer=3)
    editor = _trained_mend(model, _config(LLAMA_6))
    editor.eval()
    batch = _batch(3)["edit_inner"]
    quiet, info = editor.edit(batch)
    assert not any(k.startswith("grad/") for k in info)
    loud, info = editor.edit(batch, diagnostics=True)
    assert {f"grad/cos{i}" for i in range(6)} <= set(info)
    for n in LLAMA_6:  # the edit itself is the same either way
        torch.testing.assert_close(quiet.weights[n], loud.weights[n], rtol=0, atol=0)
    # each figure against a direct computation: the true gradient of the edit loss and the pseudo-gradient v~^T u~
    leaves = {n: model.get_parameter(n).detach().clone().requires_grad_(True) for n in LLAMA_6}
    true = torch.autograd.grad(editor.loss_with(batch, leaves)["nll"], [leaves[n] for n in LLAMA_6])
    cosines = []
    for i, n in enumerate(LLAMA_6):
        u, v = loud.last_factors[n]
        pseudo = v.t() @ u  # nn.Linear: (d_out, d_in)
        cosines.append(torch.nn.functional.cosine_similarity(true[i].reshape(-1), pseudo.reshape(-1), dim=0).item())
        assert info[f"grad/cos{i}"] == pytest.approx(cosines[i], abs=1e-5), n
        assert info[f"grad/true_mag{i}"] == pytest.approx(true[i].norm().item(), rel=1e-5), n
        assert info[f"grad/pseudo_mag{i}"] == pytest.approx(pseudo.norm().item(), rel=1e-5), n
    assert max(cosines) - min(cosines) > 0.05  # six different figures: a mix-up of weights would show


def test_an_evaluation_edit_keeps_no_graph():
    editor = _trained_mend(tiny_llama(n_layer=3), _config(LLAMA_6))
    editor.eval()
    edited, _ = editor.edit(_batch(1)["edit_inner"])
    assert all(not w.requires_grad for w in edited.weights.values())
    editor.train()
    edited, _ = editor.edit(_batch(1)["edit_inner"])
    assert all(w.requires_grad for w in edited.weights.values())


@pytest.mark.parametrize(
    "build, inner",
    [(lambda: tiny_llama(n_layer=3), LLAMA_6[3:]), (lambda: tiny_gpt2(n_layer=3), GPT2_INNER)],
    ids=["llama", "gpt2"],
)
def test_replayed_lower_blocks_give_the_logits_of_the_full_pass(build, inner):
    model = build()
    lower = LowerBlocks(model, inner)
    assert len(lower.blocks) == 2  # blocks 0 and 1 lie below the edits in block 2
    loc = model_inputs(_batch(2)["loc"])
    edited = {n: model.get_parameter(n) + 0.1 * torch.randn_like(model.get_parameter(n)) for n in inner}
    with torch.no_grad(), lower.record():
        before = model(**loc).logits
    calls = []  # the lower blocks' insides run only when the blocks are not replayed
    inside = [b.mlp for b in lower.blocks]
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in inside]
    with lower.replay(edited), torch.no_grad():
        replayed = torch.func.functional_call(model, edited, (), loc).logits
    assert calls == []
    with torch.no_grad():
        full = torch.func.functional_call(model, edited, (), loc).logits
        again = model(**loc).logits
    assert len(calls) == 4  # the two plain passes
    torch.testing.assert_close(replayed, full, rtol=0, atol=0)
    assert not torch.allclose(replayed, before)  # the edit changed the output: the upper blocks did run
    torch.testing.assert_close(again, before, rtol=0, atol=0)  # the blocks' own forward is back
    assert "forward" not in lower.blocks[0].__dict__
    # other inputs than recorded: the blocks run as usual
    other = model_inputs(_batch(3)["loc"])
    with lower.replay(edited), torch.no_grad():
        replayed = torch.func.functional_call(model, edited, (), other).logits
    assert len(calls) == 6  # other inputs: the lower blocks ran
    for h in handles:
        h.remove()
    with torch.no_grad():
        full = torch.func.functional_call(model, edited, (), other).logits
    torch.testing.assert_close(replayed, full, rtol=0, atol=0)


def test_lower_blocks_are_not_replayed_when_their_weights_are_edited_or_trained():
    model = tiny_llama(n_layer=3)
    lower = LowerBlocks(model, LLAMA_6[3:])
    with torch.no_grad(), lower.record():
        model(**model_inputs(_batch(2)["loc"]))
    assert lower.usable(LLAMA_6[3:])
    assert not lower.usable(LLAMA_6)  # a weight of block 1 is edited
    editor = ENN(model, _config(LLAMA_6[3:], train_base=True))  # ENN trains every base weight
    assert not lower.usable(editor.weights)
    assert LowerBlocks(model, ["model.embed_tokens.weight", *LLAMA_6[3:]]).blocks == []  # an edit below the blocks


def _trainer(tmp_path, **speed):
    cfg = _config(LLAMA_6[3:], **{f"speed.{k}": v for k, v in speed.items()}, accumulate_bs=1, log_interval=2)
    model = tiny_llama(n_layer=3)
    torch.manual_seed(0)
    return EditTrainer(lambda: MEND(model, cfg), cfg, SyntheticEdits(16), SyntheticEdits(8, seed=1), str(tmp_path))


def test_a_training_step_with_every_speedup_matches_the_plain_step(tmp_path):
    plain = _trainer(
        tmp_path / "plain",
        reuse_lower_blocks=False,
        batched_mlp=False,
        grad_stats_on_log_steps=False,
        no_graph_in_evaluation=False,
        label_logits_only=False,
    )
    fast = _trainer(tmp_path / "fast")
    fast.editor.load_state_dict(plain.editor.state_dict())
    ran = []  # the lower blocks' insides: run in each pass of the plain step, replayed in the post-edit one
    for trainer in (plain, fast):
        for i in (0, 1):
            trainer.editor.model.model.layers[i].mlp.register_forward_hook(lambda m, a, o, t=trainer: ran.append(t))
    for seed in range(3):
        batch = _batch(seed)
        info = {}
        for name, trainer in (("plain", plain), ("fast", fast)):
            trainer.editor.zero_grad()
            info[name] = trainer.edit_step(batch, training=True, diagnostics=True)
        for key, value in info["plain"].items():
            if not key.startswith("time/"):
                assert info["fast"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for (name, p), q in zip(plain.editor.named_parameters(), fast.editor.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
    # per step and lower block: pre-locality, edit and equivalence passes, and the post-locality one unless replayed
    assert ran.count(plain) == 3 * 2 * 4 and ran.count(fast) == 3 * 2 * 3
    # evaluation steps too, where the pre-edit pass also runs on the equivalence inputs
    for name, trainer in (("plain", plain), ("fast", fast)):
        info[name] = trainer.edit_step(_batch(7), training=False)
    for key in ("loss/loc", "nll/post", "edit/acc", "loss/edit", "edit/log_prob_pre"):
        assert info["fast"][key] == pytest.approx(info["plain"][key], rel=1e-5, abs=1e-7), key


def test_the_true_gradients_are_computed_on_the_logging_steps_only(tmp_path):
    trainer = _trainer(tmp_path, grad_stats_on_log_steps=True)
    trainer.config.max_iters = 6
    trainer.config.val_interval = 100
    trainer.config.eval.final_eval = False
    seen = []
    edit = trainer.editor.edit

    def spy(batch, condition=None, diagnostics=False):
        out, info = edit(batch, condition, diagnostics=diagnostics)
        seen.append((trainer.state.step, diagnostics, "grad/cos0" in info))
        return out, info

    trainer.editor.edit = spy
    logged = []
    trainer.log = lambda stats, step: logged.append((step, stats))
    trainer.train()
    training = [s for s in seen if s[0] < 6]
    assert [(step, diag) for step, diag, _ in training][:6] == [(s, s % 2 == 1) for s in range(6)]
    assert all(diag == has for _, diag, has in seen)
    train_logs = [stats for step, stats in logged if "grad/cos0" in stats]
    assert len(train_logs) == 3  # one figure per logging step (2, 4, 6)


def test_the_finite_check_finds_every_kind_of_non_finite_value():
    assert all_finite([torch.ones(3), None, torch.zeros(2, 2)]) and all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.zeros(1000)
        t[517] = bad
        assert not all_finite([torch.ones(3), t])
    both = torch.tensor([float("inf"), -float("inf")])  # cancelling infinities still sum to NaN
    assert not all_finite([both])


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_edit_loss_from_the_label_positions_alone_is_the_full_one(build):
    model = build(n_layer=2)
    ids = torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]  # rows with targets at different places, one of them padded
    labels[1, 3:5] = ids[1, 3:5]
    labels[2, 8] = ids[2, 8]
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    inner = [n for n, _ in model.named_parameters() if n.endswith(("mlp.c_fc.weight", "mlp.up_proj.weight"))]
    weights = {n: model.get_parameter(n) * 1.1 for n in inner}
    arch = "gpt2" if "gpt2" in type(model).__name__.lower() else "llama"
    widths = []  # positions the vocabulary head computes
    model.lm_head.register_forward_hook(lambda m, a, o: widths.append(a[0].shape[1]))
    full, kept = (
        MEND(model, make_config(arch, **{"speed.label_logits_only": on})).loss_with(batch, weights)
        for on in (False, True)
    )
    assert widths == [9, 5]  # the positions before a label (at 3, 4, 6, 7, 8): 2, 3, 5, 6, 7
    for key, value in full.items():
        torch.testing.assert_close(kept[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(kept["n_tokens"]) == 6


def test_the_fused_optimizer_takes_the_plain_optimizers_steps(tmp_path):
    plain = _trainer(tmp_path / "plain", fused_optimizer=False)
    fast = _trainer(tmp_path / "fast", fused_optimizer=True)
    assert fast.opt.defaults.get("fused") and not plain.opt.defaults.get("fused")
    fast.editor.load_state_dict(plain.editor.state_dict())
    start = {n: p.detach().clone() for n, p in plain.editor.named_parameters()}
    for seed in range(3):
        for trainer in (plain, fast):
            trainer.edit_step(_batch(seed), training=True)
            trainer._optimizer_step()
    for (name, p), q in zip(plain.editor.named_parameters(), fast.editor.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(p, start[n]) for n, p in plain.editor.named_parameters())  # the steps moved them
