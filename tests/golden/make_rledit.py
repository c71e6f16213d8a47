"""Golden values of the ORIGINAL RLEdit code (zhrli324/RLEdit) on a tiny random GPT-2 (tests/test_rledit.py).

Not run by the tests: it needs the original code, and writes ``tests/golden/rledit-gpt2.{json,safetensors}``. The
base model, the edited weights, the examples' layout and the patches are those of ``make_malmen.py`` (whose helpers
this script imports); run it outside the project's root, so that the original's ``util``, ``nets``, ``data`` and
``editor`` modules are the ones imported:

    git clone https://github.com/zhrli324/RLEdit /tmp/rledit-orig      # at c6576a1
    cd /tmp && python /path/to/tests/golden/make_rledit.py --original /tmp/rledit-orig

(the project's .venv serves: torch, transformers, omegaconf, numpy and tqdm are what the code imports; the data files
under data/raw/ are not needed).

Patches, all applied from this script (the original's files are not changed):
- ``wandb`` is an empty stand-in whose ``log`` records what the original logs (``gen_loss``, ``loc_loss`` per step of
  the sequence), and ``glue_eval.glue_eval`` (imported by ``editor/base.py`` for its GLUE evaluation, which needs
  ``sklearn`` and ``datasets.load_metric``) an empty module: training does not use it;
- the model is built from its config and the stored weights instead of ``model.make_model``, then frozen but for the
  edited modules' weights, as ``make_model`` does; everything runs on the CPU;
- the network's parameters, which the original initialises to the identity map, are replaced by seeded random values
  (``init.*``), so that every part of it acts, with step sizes that make updates of about a tenth of the weights;
- ``RLEDIT.predict_param_shifts`` is wrapped to record each step's update (``shift.<t>.<module>``) and the
  normalisation's statistics it used (``stats.<t>.<shape>.*``), and the optimiser's ``step`` to record the network's
  gradients it is given at the end of the sequence (``grad.*``).
Nothing else is changed: ``RLEDIT.train`` runs one sequence as it is (``cache`` on the model the earlier steps edited
in place, the discounted losses over the last ``back_depth`` batches, the penalty, ``update_hypernet`` with its
clip after every step, one optimiser step at the end).

The original back-propagates the locality losses of a step (``tot_loss_loc.backward()``) after it has taken the
step's update out of the weights again (``edit_model(param_shifts, True)``, an in-place change autograd does not
see): the gradient that reaches an edited weight through the edited weights above it passes through their values
without the update, whereas the rephrasings' gradient (back-propagated before the update is taken out) and MALMEN's
locality gradient pass through the edited values. Both are recorded: ``*_as_is`` from the code as it is, and the
main values from the code with that one change (``FIX_LOCALITY_BACKWARD``: each locality loss back-propagated
before the update is taken out, as MALMEN's ``BaseEditor.train`` does), the gradient of the loss the code defines.

The run: a sequence of 3 batches (``num_seq``) of 4 edits (seeded random prompts of 3-7 tokens, targets of 2-5
tokens, rephrasings of 3-7 tokens with the same target, unrelated inputs of 4-9 tokens whose every position is
scored), ``dataset.batch_size`` 2 (two tuples per role and batch), ``editor.batch_size`` 5 (the rows go through the
network in several chunks), ``back_depth`` 2 (the window is shorter than the sequence), ``time_decay`` 0.5 (the
discount is plain in the numbers), rank 8, 4 blocks, ``loc_coef`` 0.6 and ``reg_coef`` 1e-4 (the original's). Each code
runs twice: with ``max_grad_norm`` 1 (the original's: ``grad.*``) and with no clipping (``grad_unclipped.*``: the
plain sum of the three steps' gradients, in which the first steps weigh as much as the last).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from make_malmen import MODULES, base_model, make_edits, original_tuple, unrelated_tuple
from omegaconf import OmegaConf
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ORIGINAL_COMMIT = "c6576a1"
SEED, SEQ_LEN, N_EDITS, TUPLE_SIZE, NET_CHUNK, RANK, N_BLOCKS = 0, 3, 4, 2, 5, 8, 4
BACK_DEPTH, TIME_DECAY, LOC_COEF, REG_COEF = 2, 0.5, 0.6, 1e-4
# The network's step sizes: updates of about a tenth of the weights (make_malmen's 1e-4 makes them ten times the
# weights, and a sequence of such updates leaves a model whose numbers no longer agree to float32 rounding).
LR_INIT = 1e-6


# The one change of FIX_LOCALITY_BACKWARD, applied to the text of editor/rledit.py: (old, new) pairs.
FIX_LOCALITY_BACKWARD = [
    (
        "                    loss_loc += (self.config.editor.loc_coef * loss)\n",
        "                    (self.config.editor.loc_coef * loss * pow(time_decay, _)).backward()\n"
        "                    loss_loc += (self.config.editor.loc_coef * loss).detach()\n",
    ),
    ("            tot_loss_loc.backward()\n", "            pass\n"),
]


def fixed_module(original: Path) -> types.ModuleType:
    """editor/rledit.py with FIX_LOCALITY_BACKWARD, as the module ``editor.rledit_fixed``."""
    source = (original / "editor" / "rledit.py").read_text()
    for old, new in FIX_LOCALITY_BACKWARD:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    module = types.ModuleType("editor.rledit_fixed")
    module.__file__ = str(original / "editor" / "rledit_fixed.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def stub_modules(logged: list) -> None:
    """wandb (its log recorded) and the GLUE evaluation, which training does not use."""
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # transformers looks for a spec
    wandb.log = lambda values, *a, **k: logged.append({k: float(v) for k, v in values.items()})
    sys.modules["wandb"] = wandb
    glue = types.ModuleType("glue_eval.glue_eval")
    glue.GLUEEval = None
    sys.modules["glue_eval.glue_eval"] = glue


def run_sequence(rledit, BaseDataset, edits: list, max_grad_norm: float, out: dict, prefix: str) -> None:
    """One training sequence of the original's ``RLEDIT.train`` from a fresh model and the seeded network."""
    torch.manual_seed(SEED)
    model = base_model()
    for p in model.parameters():  # as model.make_model
        p.requires_grad = False
    for name in MODULES:
        model.get_submodule(name).weight.requires_grad = True
    config = OmegaConf.create(
        {
            "model_device": "cpu",
            "editor_device": "cpu",
            "num_seq": SEQ_LEN,
            "model": {"name": "tiny-gpt2", "name_or_path": "tiny-gpt2", "edit_modules": MODULES},
            "editor": {
                "name": "rledit",
                "rank": RANK,
                "n_blocks": N_BLOCKS,
                "lr": 1e-6,
                "meta_lr": 1e-5,
                "loc_coef": LOC_COEF,
                "max_grad_norm": max_grad_norm,
                "n_epochs": 1,
                "batch_size": NET_CHUNK,
                "token": "ans",
                "cache_dir": tempfile.mkdtemp(prefix="rledit-cache-"),
                "save_checkpoint": False,
                "load_checkpoint": False,
                "reg_coef": REG_COEF,
                "time_decay": TIME_DECAY,
                "back_depth": BACK_DEPTH,
            },
            "dataset": {"name": "golden", "n_edits": N_EDITS, "batch_size": TUPLE_SIZE},
        }
    )
    ed = rledit.RLEDIT(config, model)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # a network that is not the identity, with step sizes and ridges of its own
        for name, p in ed.net.named_parameters():
            if name.endswith("lr.weight"):
                p.copy_(LR_INIT * (1 + torch.rand(p.shape, generator=g)))
            elif name.endswith("lamda.weight"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    record_steps = prefix == "grad"
    if record_steps:
        for name, p in ed.net.named_parameters():
            out[f"init.{name}"] = p.detach().clone()

    predict, calls = ed.predict_param_shifts, []

    def recorded_predict():
        shifts = predict()
        t = len(calls)
        calls.append(t)
        if record_steps:
            for m, s in shifts.items():
                out[f"shift.{t}.{m}"] = s.detach().clone()
            for key, net in ed.net.items():
                for buf in ("n", "mean", "var", "std"):
                    out[f"stats.{t}.{key}.{buf}"] = getattr(net.normalizer, buf).detach().clone()
        return shifts

    ed.predict_param_shifts = recorded_predict
    step = ed.opt.step

    def recorded_step(*a, **k):
        for name, p in ed.net.named_parameters():
            if p.grad is not None:
                out[f"{prefix}.{name}"] = p.grad.detach().clone()
        return step(*a, **k)

    ed.opt.step = recorded_step

    collate = BaseDataset.__new__(BaseDataset)  # its collate_fn only: the data come from make_edits
    collate.config, collate.device = config.dataset, "cpu"
    batches = []
    for b in range(SEQ_LEN):
        items = [
            {
                "edit_tuples": original_tuple(e["prompt"], e["target"]),
                "equiv_tuples": original_tuple(e["rephrase"], e["target"]),
                "unrel_tuples": unrelated_tuple(e["unrelated"]),
            }
            for e in edits[b * N_EDITS : (b + 1) * N_EDITS]
        ]
        batches.append(collate.collate_fn(items))
    ed.train(batches)
    assert len(calls) == SEQ_LEN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", required=True, type=Path, help="a checkout of zhrli324/RLEdit")
    args = parser.parse_args()
    sys.path.insert(0, str(args.original.resolve()))
    logged: list = []
    stub_modules(logged)
    import editor.rledit  # noqa: E402  (the original's code: importable only once its folder is on the path)
    from data.base import BaseDataset  # noqa: E402

    edits = make_edits(base_model().config.vocab_size, SEQ_LEN * N_EDITS)
    out: dict = {}
    fixed = fixed_module(args.original.resolve())
    run_sequence(fixed, BaseDataset, edits, 1.0, out, "grad")
    steps_logged = list(logged)
    run_sequence(fixed, BaseDataset, edits, 1e30, out, "grad_unclipped")
    run_sequence(editor.rledit, BaseDataset, edits, 1.0, out, "grad_as_is")
    run_sequence(editor.rledit, BaseDataset, edits, 1e30, out, "grad_unclipped_as_is")

    meta = {
        "original_code": f"https://github.com/zhrli324/RLEdit at {ORIGINAL_COMMIT}",
        "base_model": "mend-original-gpt2.json / .safetensors (base.*)",
        "inner_params": [f"{m}.weight" for m in MODULES],
        "rank": RANK,
        "n_blocks": N_BLOCKS,
        "chunk_size": TUPLE_SIZE,
        "net_chunk": NET_CHUNK,
        "seq_len": SEQ_LEN,
        "n_edits": N_EDITS,
        "back_depth": BACK_DEPTH,
        "time_decay": TIME_DECAY,
        "loc_coef": LOC_COEF,
        "reg_coef": REG_COEF,
        "max_grad_norm": 1.0,
        "logged": steps_logged,  # the original's wandb.log per step: mean over the window of the batches' losses
        "edits": edits,
    }
    (HERE / "rledit-gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "rledit-gpt2.safetensors"))
    print(f"wrote rledit-gpt2.{{json,safetensors}}: {len(out)} tensors")


if __name__ == "__main__":
    main()
