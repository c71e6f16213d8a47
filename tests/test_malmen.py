"""MALMEN (algs/malmen): against the original code number for number, its staged training against plain
back-propagation, and as an editor of this project (training, checkpoints, ``python -m edit``).

``tests/golden/malmen-gpt2.*`` holds what the original code (ChenmienTan/malmen, run by ``tests/golden/make_malmen.py``)
computed in one meta-step of 8 edits on the tiny random GPT-2 of the MEND golden files, from a network with seeded
random parameters: the least-squares update of every edited weight, the normalisation's statistics and the
gradients of the network's parameters. The editor here, given the same network and examples, must give the same
update and statistics (the edit) and the same gradients (``meta_loss`` then ``meta_backward``), to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, SyntheticEdits, make_config
from safetensors.torch import load_file
from test_run import run_cli
from test_run import workspace as workspace  # noqa: F401  (the fixture: a tiny GPT-2 on disk and a gen data set)
from test_ultraedit import golden_model

import utils
from algs.malmen.editor import MALMEN
from algs.ultraedit.editor import chunked_factors
from config_schema import ModelConfig, config_for
from data_classes.batches import pad_rows, prompt_target_batch
from data_classes.requests import EditRequest
from edit import Editor
from losses import kl_loc_loss
from meta_loss import StepContext
from trainer import EditTrainer

GOLDEN = Path(__file__).parent / "golden"


# ------------------------------------------------------------------------------------------------
# The original's numbers
# ------------------------------------------------------------------------------------------------
def golden_setup(**overrides):
    """Our editor on the golden model with the golden network loaded, its batch, and the golden tensors."""
    meta = json.loads((GOLDEN / "malmen-gpt2.json").read_text())
    gold = load_file(str(GOLDEN / "malmen-gpt2.safetensors"))
    model, cls = golden_model("gpt2")
    settings = {
        "malmen.rank": meta["rank"],
        "malmen.n_blocks": meta["n_blocks"],
        "malmen.chunk_size": meta["chunk_size"],
        "malmen.net_chunk": meta["net_chunk"],
        "cedit": 1.0,
        "cloc": meta["loc_coef"],
    }
    cfg = config_for(
        ModelConfig(name="golden-gpt2", class_name=cls, inner_params=meta["inner_params"]),
        "gen",
        "malmen",
        **{**settings, **overrides},
    )
    editor = MALMEN(model, cfg)
    state = {}
    for key, value in gold.items():  # "(32, 128).blocks.0.A" -> "32x128.blocks.0.A"
        if key.startswith("init."):
            shape, rest = key[len("init.") :].split(")", 1)
            state["net." + "x".join(shape.strip("(").replace(" ", "").split(",")) + rest] = value
    missing, unexpected = editor.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("count", "mean", "m2")) for k in missing), (missing, unexpected)
    edits = meta["edits"]
    loc_ids, loc_mask = pad_rows([e["unrelated"] for e in edits], 0)
    batch = {
        "edit_inner": prompt_target_batch([(e["prompt"], e["target"]) for e in edits], pad_id=0),
        "edit_outer": prompt_target_batch([(e["rephrase"], e["target"]) for e in edits], pad_id=0),
        "loc": {
            "input_ids": loc_ids,
            "attention_mask": loc_mask,
            "labels": torch.where(loc_mask.bool(), loc_ids, -100),
        },
    }
    return editor, batch, gold, meta


def shape_key(key: str) -> str:
    return "(" + ", ".join(key.split("x")) + ")"


def update_errors(editor, batch, gold, meta) -> tuple:
    """The largest error of our update (relative to the size of the original's) and of the statistics."""
    editor.train()
    edited, _ = editor.edit(batch["edit_inner"])
    weight_err = 0.0
    for n in meta["inner_params"]:
        ours = edited.weights[n] - editor.model.get_parameter(n)
        theirs = gold[f"shift.{n[: -len('.weight')]}"]  # GPT-2's Conv1D: the update is in the weight's layout
        weight_err = max(weight_err, ((ours - theirs).norm() / theirs.norm()).item())
    stats_err = 0.0
    for key, net in editor.net.items():
        norm, k = net.normalizer, shape_key(key)
        theirs_std = gold[f"stats.{k}.std"]
        ours_std = (norm.m2 / (norm.count - 1 + torch.finfo(torch.float32).eps)).sqrt()
        for ours, theirs in ((norm.count, gold[f"stats.{k}.n"]), (norm.mean, gold[f"stats.{k}.mean"])):
            stats_err = max(stats_err, ((ours - theirs).norm() / theirs.norm()).item())
        stats_err = max(stats_err, ((norm.m2 - gold[f"stats.{k}.var"]).norm() / gold[f"stats.{k}.var"].norm()).item())
        stats_err = max(stats_err, ((ours_std - theirs_std).norm() / theirs_std.norm()).item())
    return weight_err, stats_err


def test_the_original_code_gives_the_same_least_squares_update_and_statistics():
    weight_err, stats_err = update_errors(*golden_setup())
    assert weight_err < 1e-4 and stats_err < 1e-5, (weight_err, stats_err)


def _mend_sum(self, keys, grads):
    """MEND's aggregation in place of the solve: dW = -eta * sum_i k~_i d~_i^T."""
    updates = {}
    with torch.no_grad():
        for name in self.inner_params:
            net, idx = self._net(name)
            pseudo_keys, pseudo_grads = net(keys[name], grads[name], idx)
            updates[name] = -net.lr(idx) * pseudo_keys.T @ pseudo_grads
    return updates, {}


@pytest.mark.parametrize("change", ["MEND's sum", "ridge", "chunking", "no normalisation"])
def test_a_changed_update_is_caught_by_the_golden_values(change, monkeypatch):
    """The comparison above is sharp enough to see each of these changes, by orders of magnitude."""
    overrides = {}
    if change == "MEND's sum":
        monkeypatch.setattr(MALMEN, "_updates", _mend_sum)
    elif change == "ridge":
        overrides = {"malmen.log_ridge": 0.05}
    elif change == "chunking":
        overrides = {"malmen.chunk_size": 8}  # one pass for all the edits: their gradients averaged over all
    elif change == "no normalisation":
        from algs.malmen.editor import MalmenNorm

        monkeypatch.setattr(MalmenNorm, "forward", lambda self, x: x)
    editor, batch, gold, meta = golden_setup(**overrides)
    if change == "ridge":  # the loaded network sets lambda: shift it
        with torch.no_grad():
            for net in editor.net.values():
                net.lamda.weight.add_(0.05)
    weight_err, _ = update_errors(editor, batch, gold, meta)
    assert weight_err > 1e-2, (change, weight_err)


def meta_gradients(editor, batch) -> dict:
    """The gradients of the network's parameters from one training meta-step (``meta_loss`` then
    ``meta_backward``), as the trainer's backward receives them."""
    editor.train()
    params = dict(editor.named_parameters())
    grads = {}

    def backward(loss):
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            grads[name] = g

    losses = editor.meta_loss(batch, StepContext(training=True))
    editor.meta_backward(losses, backward)
    return grads


def test_the_original_code_gives_the_same_meta_gradients():
    editor, batch, gold, _ = golden_setup()
    grads = meta_gradients(editor, batch)
    checked = 0
    for key, theirs in gold.items():
        if not key.startswith("grad."):
            continue
        shape, rest = key[len("grad.") :].split(")", 1)
        ours = grads["net." + "x".join(shape.strip("(").replace(" ", "").split(",")) + rest]
        err = ((ours - theirs).norm() / theirs.norm()).item()
        assert err < 1e-3, (key, err)
        checked += 1
    assert checked == len(list(editor.parameters()))


# ------------------------------------------------------------------------------------------------
# The staged training step equals plain back-propagation
# ------------------------------------------------------------------------------------------------
def naive_meta_gradients(editor, batch) -> dict:
    """The same meta-loss back-propagated in one piece: the solve differentiated by autograd, every chunk's graph
    kept until the end."""
    editor.train()
    size = int(editor.config.malmen.chunk_size)
    keys, grads, _ = editor._factors(batch["edit_inner"])
    weights = {}
    for name in editor.inner_params:
        net, idx = editor._net(name)
        values = net.shifts(keys[name], grads[name], idx)
        k = keys[name]
        eye = torch.eye(k.shape[1])
        delta = torch.linalg.solve(k.T @ k + net.lamda(idx).exp() * eye, k.T @ values)
        w = editor.model.get_parameter(name)
        weights[name] = w + (delta if editor.layout[name][0] else delta.T)
    edited = editor.with_weights(weights)
    loss = 0.0
    outer, loc = batch["edit_outer"], batch["loc"]
    order = sorted(range(len(outer["input_ids"])), key=lambda i: -int(outer["attention_mask"][i].sum()))
    for s in range(0, len(order), size):
        rows = torch.tensor(order[s : s + size])
        loss = loss + edited.loss_with({k: v[rows] for k, v in outer.items()}, {})["nll"]
    order = sorted(range(len(loc["input_ids"])), key=lambda i: -int(loc["attention_mask"][i].sum()))
    for s in range(0, len(order), size):
        rows = torch.tensor(order[s : s + size])
        inputs = {"input_ids": loc["input_ids"][rows], "attention_mask": loc["attention_mask"][rows]}
        with torch.no_grad():
            pre = editor(**inputs)
        loss = loss + kl_loc_loss(pre, edited(**inputs), inputs["attention_mask"])
    params = dict(editor.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_staged_meta_step_gives_the_gradients_of_plain_back_propagation(arch):
    """On a tiny model with a random network: the chunked, staged step (the solve's gradient by hand, the network
    re-run in chunks of rows) gives the gradient autograd computes through the whole graph at once."""
    g = torch.Generator().manual_seed(3)

    def rows(n, lo, hi):
        return [
            torch.randint(1, 40, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)
        ]

    prompts, targets, rephrases, unrelated = rows(6, 3, 7), rows(6, 1, 4), rows(6, 3, 7), rows(6, 4, 9)
    loc_ids, loc_mask = pad_rows(unrelated, 0)
    batch = {
        "edit_inner": prompt_target_batch(list(zip(prompts, targets)), 0),
        "edit_outer": prompt_target_batch(list(zip(rephrases, targets)), 0),
        "loc": {
            "input_ids": loc_ids,
            "attention_mask": loc_mask,
            "labels": torch.where(loc_mask.bool(), loc_ids, -100),
        },
    }
    overrides = {"malmen.rank": 4, "malmen.chunk_size": 4, "malmen.net_chunk": 7, "malmen.edit_lr": 1e-3, "cedit": 1.0}
    results = []
    for fn in (meta_gradients, naive_meta_gradients):
        torch.manual_seed(0)
        editor = MALMEN(TINY[arch][0](), make_config(arch, alg="malmen", **overrides))
        with torch.no_grad():  # a network that is not the identity
            for p in editor.net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        results.append(fn(editor, batch))
    staged, naive = results
    assert set(staged) == set(naive)
    for name in staged:
        assert naive[name] is not None and staged[name] is not None, name
        err = ((staged[name] - naive[name]).norm() / naive[name].norm()).item()
        assert err < 2e-3, (name, err)  # float32 rounding: ~1e-5, the ridge's gradient (a sum that cancels) ~6e-4


# ------------------------------------------------------------------------------------------------
# As an editor of this project
# ------------------------------------------------------------------------------------------------
def test_one_edit_of_many_requests_is_one_least_squares_update_and_the_base_is_never_written():
    """Many requests in one ``edit``: every one of them enters the same solve (the update is not the sum of the
    requests' own updates), and the base model's weights are untouched."""
    torch.manual_seed(0)
    editor = MALMEN(TINY["llama"][0](), make_config("llama", alg="malmen", **{"malmen.edit_lr": 1e-2}))
    base = {n: p.clone() for n, p in editor.model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    rows = [(torch.randint(1, 40, (5,), generator=g).tolist(), torch.randint(1, 40, (2,), generator=g).tolist())]
    rows += [(torch.randint(1, 40, (5,), generator=g).tolist(), torch.randint(1, 40, (2,), generator=g).tolist())]
    editor.train()
    for r in rows:  # statistics to standardise with, as training leaves them
        editor.edit(prompt_target_batch([r], 0))
    editor.eval()
    both, info = editor.edit(prompt_target_batch(rows, 0))
    assert info["malmen/positions"] == 4  # two target positions per request
    alone = [editor.edit(prompt_target_batch([r], 0))[0] for r in rows]
    name = editor.inner_params[0]
    summed = sum(a.weights[name] - base[name] for a in alone)
    assert not torch.allclose(both.weights[name] - base[name], summed, rtol=1e-3)
    for n, p in editor.model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_a_partial_chunk_asks_for_the_shift_of_a_full_chunk():
    """The edit loss is a chunk's mean over its target tokens, so one request alone would have ``chunk_size`` times
    the gradient it has in a full chunk, the only kind the network is trained on (and the original edits). One
    request, alone, gives the factors it has in a chunk of ``chunk_size`` copies of itself; the unscaled factors
    are ``chunk_size`` times larger."""
    torch.manual_seed(0)
    editor = MALMEN(TINY["llama"][0](), make_config("llama", alg="malmen", **{"malmen.chunk_size": 4}))
    editor.eval()
    row = ([5, 9, 11, 3, 7], [21, 30])
    _, alone, _ = editor._factors(prompt_target_batch([row], 0))
    _, full, _ = editor._factors(prompt_target_batch([row] * 4, 0))
    unscaled = chunked_factors(editor, prompt_target_batch([row], 0), 4)[1]
    for name in editor.inner_params:
        assert alone[name].shape[0] == 2 and full[name].shape[0] == 8
        torch.testing.assert_close(alone[name], full[name][:2], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(unscaled[name][0], 4 * alone[name], rtol=1e-4, atol=1e-7)
        assert alone[name].abs().max() > 0


def test_it_trains_checkpoints_and_resumes_through_the_trainer(tmp_path):
    """Three meta-steps of 3 edits each through the unchanged trainer; the resumed run continues from last.pt."""
    settings = {
        "malmen.rank": 4,
        "malmen.chunk_size": 2,
        "malmen.edit_lr": 1e-3,
        "accumulate_bs": 1,  # as config/alg/malmen.yaml
        "grad_clip": 1.0,
        "cedit": 1.0,
        "data.n_edits": 3,
        "batch_size": 6,
        "val_batch_size": 6,
        "max_iters": 3,
        "val_interval": 100,
        "val_steps": 2,
        "log_interval": 1,
        "eval.compare_untrained": False,
    }
    cfg = make_config("llama", alg="malmen", **settings)
    model = TINY["llama"][0]()
    utils.seed_everything(cfg.seed)
    trainer = EditTrainer(
        lambda: MALMEN(model, cfg), cfg, SyntheticEdits(48, seed=0), SyntheticEdits(16, seed=1), str(tmp_path / "a")
    )
    before = [p.detach().clone() for p in trainer.editor.outer_parameters()]
    trainer.train()
    after = list(trainer.editor.outer_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(m.count.item() > 0 for m in trainer.editor.running_statistics().values())
    assert (tmp_path / "a" / "checkpoints" / "last.pt").is_file()
    resumed_cfg = make_config("llama", alg="malmen", **{**settings, "max_iters": 4, "resume": str(tmp_path / "a")})
    resumed = EditTrainer(
        lambda: MALMEN(model, resumed_cfg),
        resumed_cfg,
        SyntheticEdits(48, seed=0),
        SyntheticEdits(16, seed=1),
        str(tmp_path / "a"),
    )
    assert resumed.state.step == 3
    for a, b in zip(resumed.editor.outer_parameters(), after):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_python_m_run_trains_it_and_python_m_edit_applies_many_requests_in_one_patch(workspace, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = run_cli(
        workspace,
        "max_iters=4", "val_interval=2", "val_steps=2", "log_interval=2", "data.n_edits=3", "batch_size=6",
        "val_batch_size=6", "malmen.rank=8", "malmen.chunk_size=2", "eval.final_steps=2",
        run_dir=run_dir, alg="malmen",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((run_dir / "results.json").read_text())
    assert report["config"]["alg"] == "malmen" and report["train"]["steps"] == 4
    editor = Editor.from_archive(str(run_dir), cache_dir=workspace["cache"])
    requests = [
        {"prompt": "The old museum", "target": "market square"},
        {"prompt": "Winter", "target": "harbour"},
        {"prompt": "The bridge", "target": "river"},
    ]
    result = editor.apply(requests, mode="batched")
    assert len(result.model.patches) == 1  # the three requests in one least-squares update
    assert len(result.model.patches[0].meta["requests"]) == 3
    toks = [editor.tokenize(EditRequest.from_dict(r, "request")) for r in requests]
    with torch.no_grad():
        direct, _ = editor.alg.edit(editor.batch([(t.prompt, t.target) for t in toks]))
    assert result.model.weights
    for name, w in result.model.weights.items():  # the patch is the editor's one edit of the three
        torch.testing.assert_close(w, direct.weights[name], rtol=1e-5, atol=1e-6)


def test_the_chunked_locality_and_rephrasing_figures_are_those_of_the_whole_batch():
    """``meta_loss`` never holds the whole batch's logits: its figures, merged over chunks of 2, are those of one pass
    over the batch (the locality inputs before and after the edit, the rephrasings after it)."""
    editor, batch, _, _ = golden_setup(**{"malmen.chunk_size": 2})
    editor.train()
    editor.edit(batch["edit_inner"])  # statistics to standardise with
    editor.eval()
    losses = editor.meta_loss(batch, StepContext(training=False))
    loc = {k: batch["loc"][k] for k in ("input_ids", "attention_mask")}
    edited = editor.with_weights(losses.saved["leaves"])
    with torch.no_grad():
        expected = {
            "pre": editor.edit_loss_fn(editor(**loc), batch["loc"]["labels"]),
            "post": editor.edit_loss_fn(edited(**loc), batch["loc"]["labels"]),
            "edit": edited.loss_with(batch["edit_outer"], {}),
            "edit_pre": editor.loss_with(batch["edit_outer"], {}),
        }
        kl = kl_loc_loss(editor(**loc), edited(**loc), loc["attention_mask"])
    got = {
        "pre": editor.loc_loss_fn(losses.pre_loc_logits, batch["loc"]["labels"]),
        "post": editor.loc_loss_fn(losses.post_loc_logits.detach(), batch["loc"]["labels"]),
        "edit": losses.post_edit,
        "edit_pre": losses.pre_edit,
    }
    for part, metrics in expected.items():
        for key in ("nll", "acc", "acc_tok", "prob", "nll_sum", "n_tokens"):
            torch.testing.assert_close(
                got[part][key].float(), metrics[key].float(), rtol=1e-5, atol=1e-6, msg=f"{part} {key}"
            )
    torch.testing.assert_close(losses.loc, kl, rtol=1e-5, atol=1e-7)
