"""MEND against the original implementation (eric-mitchell/mend), number for number.

``tests/golden/`` holds what the original code computed on a tiny random GPT-2 (Conv1D layers) and a tiny random
GPT-Neo (nn.Linear layers): the base weights, one batch, the original editor's state after a seeded perturbation
and 4 training-mode edits, the edited weights of one eval-mode edit, the normalisation statistics after one
training-mode edit, the three losses of that step, and the gradient of the total loss with respect to every editor
parameter. This test loads that editor state into ``algs.mend.editor.MEND`` and checks every one of those values.

The same values exist for the variants on GPT-2 (``mend-original-gpt2-<variant>.*``, written from the original code
by ``tests/golden/make_variants.py``; base model and batches from the default's file): ``mend.combine=false`` with
both sides transformed, ``one_sided`` (the smaller side), ``x_only``, ``delta_only``, and ``mend.shared=false``. Their
edited weights include two square (32 x 32) attention projections, whose sides have the same size. An editor that
transforms another side than the original has other MLPs (the loading says which), and one that feeds a side the
wrong weight's mode gives other numbers.

The original applies W + edit_lrs * g~; the paper (and our default, ``mend.update_rule=paper``) W - alpha * g~. Both
rules are checked: the original's ``edit_lrs`` negated under the paper's rule, and as they are under
``mend.update_rule=original``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import config_for, freeze
from safetensors.torch import load_file

from algs.mend.editor import MEND
from config_schema import ModelConfig
from losses import kl_loc_loss

GOLDEN = Path(__file__).parent / "golden"
# (arch, variant): the default settings (combine, shared) on both layouts, and the variants on GPT-2, written by
# tests/golden/make_variants.py from the original code: combine=False transforming both sides, only the smaller side
# (one_sided), only x (x_only), only delta (delta_only), and one combined transform per weight (shared=False).
CASES = [
    ("gpt2", None),
    ("gptneo", None),
    ("gpt2", "both-sides"),
    ("gpt2", "one-sided"),
    ("gpt2", "x-only"),
    ("gpt2", "delta-only"),
    ("gpt2", "unshared"),
]
CASE_IDS = [arch if variant is None else f"{arch}-{variant}" for arch, variant in CASES]


def load_golden(arch: str, variant: str | None = None):
    """The golden values of ``arch`` at the default settings, or of one variant: a variant's file holds the
    editor's state and what it computed, and takes the base model and the batches from the default's file."""
    meta = json.loads((GOLDEN / f"mend-original-{arch}.json").read_text())
    tensors = load_file(str(GOLDEN / f"mend-original-{arch}.safetensors"))
    if variant is None:
        return meta, tensors
    own = json.loads((GOLDEN / f"mend-original-{arch}-{variant}.json").read_text())
    assert own["base_and_batches"] == f"mend-original-{arch}.safetensors"
    kept = {k: v for k, v in tensors.items() if k.startswith(("base.", "batch."))}
    return {**meta, **own}, {**kept, **load_file(str(GOLDEN / f"mend-original-{arch}-{variant}.safetensors"))}


def section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def base_model(meta: dict, tensors: dict):
    cls = getattr(transformers, meta["model_class"])
    config_cls = transformers.AutoConfig.for_model(meta["model_config"]["model_type"]).__class__
    model_config = config_cls.from_dict(meta["model_config"])
    model = cls(model_config)
    missing, unexpected = model.load_state_dict(section(tensors, "base."), strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to the input embedding
    model.tie_weights()
    return freeze(model)


def our_name(original: str) -> str:
    """An editor key of the original (``mend.(32, 128).mlp.layers.0.mode_scale.weight``) as ours.

    A shared transform is keyed by its weights' shape, an unshared one by its weight's name with '#' for '.' (as in
    the original); the original's ``mlp1`` transforms x (our u side), its ``mlp2`` delta (our v side)."""
    name = re.sub(r"^mend\.\((\d+), (\d+)\)\.", lambda m: f"mend.{m.group(1)}x{m.group(2)}.", original)
    name = name.replace(".mlp1.", ".mlp_u.").replace(".mlp2.", ".mlp_v.")
    return name.replace(".mode_scale.", ".scale.").replace(".mode_shift.", ".shift.")


def make_editor(arch: str, update_rule: str = "paper", variant: str | None = None):
    meta, tensors = load_golden(arch, variant)
    model = base_model(meta, tensors)
    m = meta["mend_config"]["mend"]
    cfg = config_for(
        ModelConfig(name=f"golden-{arch}", class_name=meta["model_class"], inner_params=meta["inner_params"]),
        "gen",
        "mend",
        mend__edit_lr=meta["mend_config"]["edit_lr"],
        cedit=meta["mend_config"]["cedit"],
        cloc=meta["mend_config"]["cloc"],
    )
    for key in ("rank", "n_hidden", "init", "norm", "combine", "one_sided", "x_only", "delta_only", "shared"):
        cfg.mend[key] = m[key]
    cfg.mend.update_rule = update_rule
    editor = MEND(model, cfg)

    warm = section(tensors, "editor_warm.")
    sign = -1.0 if update_rule == "paper" else 1.0
    params = dict(editor.named_parameters())
    buffers = dict(editor.named_buffers())
    # The same MLPs on the same sides: an editor that transforms another side than the original has other parameters.
    theirs = {our_name(k) for k in warm if not re.search(r"\.(u_std|v_std|u_mean|v_mean|u_s|v_s|k)$", k)}
    assert theirs == set(params), (
        f"the editor's parameters are not the original's: ours only {sorted(set(params) - theirs)}, "
        f"the original's only {sorted(theirs - set(params))}"
    )
    shapes = {our_name(k): tuple(v.shape) for k, v in warm.items() if our_name(k) in params}
    ours = {n: tuple(p.shape) for n, p in params.items()}
    assert ours == shapes, {n: (ours[n], shapes[n]) for n in ours if ours[n] != shapes[n]}
    with torch.no_grad():
        params["edit_lrs"].copy_(sign * warm["edit_lrs"])
        for key, value in warm.items():
            name = our_name(key)
            if key == "edit_lrs" or re.search(r"\.(u_std|v_std)$", key):
                continue  # the std is derived from the sum of squares and the count
            stat = re.search(r"\.(u|v)_(mean|s)$|\.k$", key)
            if stat is None:
                params[name].copy_(value)
                continue
            prefix = name[: name.rfind(".")]
            if key.endswith(".k"):
                for side in ("u", "v"):
                    buffers[f"{prefix}.norm_{side}.count"].fill_(value.item())
            else:
                side, kind = stat.group(1), stat.group(2)
                buffers[f"{prefix}.norm_{side}.{'mean' if kind == 'mean' else 'm2'}"].copy_(value)
    return editor, meta, tensors, sign


def batches(tensors: dict):
    return section(tensors, "batch.edit."), section(tensors, "batch.outer."), section(tensors, "batch.loc.")


@pytest.mark.parametrize("update_rule", ["paper", "original"])
@pytest.mark.parametrize(("arch", "variant"), CASES, ids=CASE_IDS)
def test_eval_mode_edit_gives_the_original_weights(arch, variant, update_rule):
    editor, meta, tensors, _ = make_editor(arch, update_rule, variant)
    case = arch if variant is None else f"{arch}-{variant}"
    edit, _, _ = batches(tensors)
    stats_before = {k: v.clone() for k, v in editor.named_buffers()}
    editor.eval()
    edited, _ = editor.edit(edit)
    for name, want in section(tensors, "edited_eval.").items():
        base = editor.model.get_parameter(name)
        update = (want - base).norm()
        assert update > 0
        err = (edited.weights[name].detach() - want).norm() / update
        assert err < 1e-5, f"{case} {name}: edited weight differs from the original's by {err:.2e} of the update"
    # An eval-mode edit leaves the normalisation statistics where they were.
    for k, v in editor.named_buffers():
        assert torch.equal(v, stats_before[k]), k


@pytest.mark.parametrize("update_rule", ["paper", "original"])
@pytest.mark.parametrize(("arch", "variant"), CASES, ids=CASE_IDS)
def test_training_step_gives_the_original_statistics_losses_and_gradients(arch, variant, update_rule):
    editor, meta, tensors, sign = make_editor(arch, update_rule, variant)
    case = arch if variant is None else f"{arch}-{variant}"
    edit, outer, loc = batches(tensors)
    cfg = editor.config
    editor.train()
    with torch.no_grad():
        pre_loc = editor(**loc)
    edited, _ = editor.edit(edit)
    l_edit = edited.edit_loss_fn(
        edited(input_ids=outer["input_ids"], attention_mask=outer["attention_mask"]), outer["labels"]
    )["nll"]
    l_loc = kl_loc_loss(pre_loc, edited(**loc), loc["attention_mask"])
    l_total = cfg.cedit * l_edit + cfg.cloc * l_loc
    for name, ours, want in (
        ("edit", l_edit, "loss.edit"),
        ("loc", l_loc, "loss.loc"),
        ("total", l_total, "loss.total"),
    ):
        assert abs(ours.item() - tensors[want].item()) <= 1e-5 * max(1.0, abs(tensors[want].item())), (
            f"{case} loss/{name}: {ours.item()} vs the original's {tensors[want].item()}"
        )

    # The normalisation statistics after the training-mode edit.
    buffers = dict(editor.named_buffers())
    for key, want in section(tensors, "stats_after_step.").items():
        prefix = our_name(key)[: our_name(key).rfind(".")]
        if key.endswith(".k"):
            assert buffers[f"{prefix}.norm_u.count"].item() == pytest.approx(want.item())
            continue
        side, kind = re.search(r"\.(u|v)_(mean|s|std)$", key).groups()
        norm = getattr(editor.mend[prefix.split(".")[1]], f"norm_{side}")
        ours = {"mean": norm.mean, "s": norm.m2, "std": (norm.m2 / (norm.count - 1)).sqrt()}[kind]
        torch.testing.assert_close(ours.float(), want.float(), rtol=1e-5, atol=1e-6, msg=f"{case} {key}")

    # Every editor gradient (the step sizes' flips with the rule: ours = -original under the paper's).
    params = dict(editor.named_parameters())
    grads = torch.autograd.grad(l_total, list(params.values()))
    ours = dict(zip(params, grads))
    for key, want in section(tensors, "grad.").items():
        got = ours[our_name(key)] * (sign if key == "edit_lrs" else 1.0)
        scale = want.norm().clamp(min=1e-12)
        err = (got - want).norm() / scale
        assert err < 1e-3, f"{case} gradient of {key}: relative difference {err:.2e}"
