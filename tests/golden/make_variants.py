"""Golden values of the ORIGINAL MEND code for its variants: combine=False (both sides, one_sided, x_only,
delta_only) and shared=False.

Not run by the tests: it needs the original implementation checked out and the stock ``higher`` 0.2.1, and writes
``tests/golden/mend-original-gpt2-<variant>.{json,safetensors}``, which
``tests/test_original_equivalence.py`` reads. The base model and the three batches are those of the default's golden
file (``mend-original-<arch>.safetensors``, read here and by the test); the variant files hold only what the variant
computes. Run it outside the project's root, so that the original's ``utils``, ``losses``, ``nn`` and
``editable_model`` modules are imported rather than the project's:

    git clone https://github.com/eric-mitchell/mend /tmp/mend-orig          # at e04fdb9
    pip install --no-deps --target /tmp/hg higher==0.2.1
    cd /tmp && PYTHONPATH=/tmp/hg python /path/to/tests/golden/make_variants.py --original /tmp/mend-orig

(the project's .venv serves: torch, transformers, safetensors, hydra-core and numpy are all the original needs here).

Patches to the original, all applied from this script (its files are not changed):
- ``algs/mend.py`` calls ``make_functional(model, in_place=True)``, an argument of the authors' fork of ``higher``;
  stock ``higher.patch.monkeypatch`` has no ``in_place``, so the call goes to it without that argument (the
  functional model then holds copies of the base weights: same values, and the base weights receive no gradient in
  either version).
Nothing else is changed: the editor, its MLPs (``nn.py``), the hooks, the losses and the training step (the
original ``trainer.py``'s ``edit_step``, written out below as it reads there) run as they are, on the CPU.

Each variant's editor starts from the original's own initialisation (seeded), is moved away from it by a seeded
perturbation of every MLP weight (so that no side is the identity), gets distinct step sizes, and warms its
normalisation statistics with 4 training-mode edits of seeded random batches. Then it records:
``editor_warm.*`` (that state, the original's names), ``edited_eval.*`` (the edited weights after one eval-mode edit
of ``batch.edit``), ``stats_after_step.*``, ``grad.*`` and ``loss.*`` (one training-mode step: edit of
``batch.edit``, 0.1 * NLL on ``batch.outer`` + 1.0 * KL on ``batch.loc``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent

# name -> (arch, mend settings that differ from the default golden's, seed). The edited weights: the two square
# attention output projections (32 x 32: both sides have the same size, so that transforming the wrong side changes
# the numbers and not only the shapes; one shared transform with two modes) and the MLP of the last block (one
# transform per shape, 32 -> 128 and 128 -> 32).
INNER = {
    "gpt2": [
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.2.attn.c_proj.weight",
        "transformer.h.2.mlp.c_fc.weight",
        "transformer.h.2.mlp.c_proj.weight",
    ],
}
UNCOMBINED = {"combine": False, "rank": 4}
VARIANTS = {
    "both-sides": ("gpt2", {**UNCOMBINED}, 1),
    # rank 40 exceeds the size of every transformed side (32): the original's min(rank, dim) applies
    "one-sided": ("gpt2", {**UNCOMBINED, "one_sided": True, "rank": 40}, 2),
    "x-only": ("gpt2", {**UNCOMBINED, "x_only": True}, 3),
    "delta-only": ("gpt2", {**UNCOMBINED, "delta_only": True}, 4),
    "unshared": ("gpt2", {"shared": False, "rank": 4}, 5),
}
N_WARM_EDITS = 4


def section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def base_model(meta: dict, tensors: dict) -> torch.nn.Module:
    cls = getattr(transformers, meta["model_class"])
    config_cls = transformers.AutoConfig.for_model(meta["model_config"]["model_type"]).__class__
    model = cls(config_cls.from_dict(meta["model_config"]))
    missing, unexpected = model.load_state_dict(section(tensors, "base."), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def namespace(d):
    if isinstance(d, dict):
        return types.SimpleNamespace(**{k: namespace(v) for k, v in d.items()})
    return d


def mend_config(meta: dict, settings: dict, inner: list) -> tuple:
    cfg = copy.deepcopy(meta["mend_config"])
    cfg["mend"].update(settings)
    cfg["model"]["inner_params"] = list(inner)
    return cfg, namespace(cfg)


def warm_batches(seed: int, vocab: int, n: int = N_WARM_EDITS):
    g = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[:, :6] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@torch.no_grad()
def perturb(editor, seed: int) -> None:
    """Move every MLP weight away from the original's initialisation, so that no layer is the identity."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(editor.mend.named_parameters()):
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(".u"):
            p.add_(0.05 * noise)
        elif name.endswith(".v"):
            pass  # already N(0, 1) from the original's init
        elif name.endswith("mode_scale.weight"):
            p.add_(0.02 * noise)
        else:  # bias, mode_shift
            p.add_(0.02 * noise)
    editor.edit_lrs.copy_(torch.arange(1, len(editor.edit_lrs) + 1, dtype=torch.float32) * 1e-3)


def editor_state(editor) -> dict:
    state = {f"mend.{k}": v.detach().clone() for k, v in editor.mend.state_dict().items()}
    state["edit_lrs"] = editor.edit_lrs.detach().clone()
    return state


def stats(editor) -> dict:
    return {f"mend.{k}": v.detach().clone() for k, v in editor.mend.named_buffers()}


def run_variant(name: str, original_mend, kl_loc_loss) -> None:
    arch, settings, seed = VARIANTS[name]
    inner = INNER[arch]
    meta = json.loads((HERE / f"mend-original-{arch}.json").read_text())
    tensors = load_file(str(HERE / f"mend-original-{arch}.safetensors"))
    edit, outer, loc = (section(tensors, f"batch.{b}.") for b in ("edit", "outer", "loc"))
    model = base_model(meta, tensors)
    cfg_dict, cfg = mend_config(meta, settings, inner)

    torch.manual_seed(seed)
    editor = original_mend.MEND(model, cfg, lambda: copy.deepcopy(model))
    perturb(editor, seed)
    editor.train()
    for batch in warm_batches(seed, meta["model_config"]["vocab_size"]):
        editor.edit(batch)
    warm = editor_state(editor)

    # One eval-mode edit: no statistics update.
    editor.eval()
    edited, _ = editor.edit(edit)
    edited_params = dict(edited.model.named_parameters())
    edited_eval = {n: edited_params[n].detach().clone() for n in inner}
    assert all(torch.equal(v, warm[k]) for k, v in stats(editor).items()), "eval-mode edit moved the statistics"

    # One training-mode step, as the original trainer.py's edit_step computes it.
    editor.train()
    with torch.no_grad():
        base_logits = editor(**loc)
    edited, _ = editor.edit(edit)
    post_edit_logits = edited(**outer)
    l_edit = editor.edit_loss_fn(post_edit_logits, outer["labels"])["nll"]
    post_base_logits = edited(**loc)
    l_loc = kl_loc_loss(base_logits.detach(), post_base_logits, mask=loc["attention_mask"])
    l_total = cfg.cedit * l_edit + cfg.cloc * l_loc
    names = [f"mend.{k}" for k, _ in editor.mend.named_parameters()] + ["edit_lrs"]
    grads = torch.autograd.grad(l_total, editor.outer_parameters())
    assert len(names) == len(grads)

    out = {f"editor_warm.{k}": v for k, v in warm.items()}
    out.update({f"edited_eval.{k}": v for k, v in edited_eval.items()})
    out.update({f"stats_after_step.{k}": v for k, v in stats(editor).items()})
    out.update({f"grad.{k}": g.detach().clone() for k, g in zip(names, grads)})
    losses = {"edit": l_edit.item(), "loc": l_loc.item(), "total": l_total.item()}
    out.update({f"loss.{k}": torch.tensor([v]) for k, v in losses.items()})
    out = {k: v.contiguous().float() for k, v in out.items()}

    stem = f"mend-original-{arch}-{name}"
    save_file(out, str(HERE / f"{stem}.safetensors"))
    info = {
        "variant": name,
        "arch": arch,
        "base_and_batches": f"mend-original-{arch}.safetensors",
        "mend_config": cfg_dict,
        "inner_params": list(inner),
        "update_rule_of_original_code": meta["update_rule_of_original_code"],
        "seed": seed,
        "warm_edits": N_WARM_EDITS,
        "made_by": "tests/golden/make_variants.py (the original code at e04fdb9, higher 0.2.1, "
        f"torch {torch.__version__}, transformers {transformers.__version__})",
        "losses": losses,
        "keys": sorted(out),
    }
    (HERE / f"{stem}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{stem}: losses {losses}, {sum(v.numel() for v in out.values())} values")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", required=True, help="a checkout of eric-mitchell/mend")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    if Path.cwd().resolve() == HERE.parent.parent:
        sys.exit("run this script outside the project's root: the original's modules share names with the project's")
    sys.path.insert(0, str(Path(args.original).resolve()))
    # Imported here, not at the top: the original code is found only once its checkout is on sys.path.
    import higher.patch  # noqa: PLC0415

    import algs.mend as original_mend  # noqa: PLC0415
    from losses import kl_loc_loss  # noqa: PLC0415  (the original's losses.py)

    assert Path(original_mend.__file__).resolve().is_relative_to(Path(args.original).resolve())

    def make_functional(module, in_place=False, **kwargs):  # the one patch: stock higher has no in_place
        return higher.patch.monkeypatch(module, **kwargs)

    original_mend.make_functional = make_functional
    for name in args.only:
        run_variant(name, original_mend, kl_loc_loss)


if __name__ == "__main__":
    main()
