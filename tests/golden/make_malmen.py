"""Golden values of the ORIGINAL MALMEN code (ChenmienTan/malmen) on a tiny random GPT-2 (tests/test_malmen.py).

Not run by the tests: it needs the original code checked out, and writes ``tests/golden/malmen-gpt2.{json,
safetensors}``. The base model is the tiny random GPT-2 (Conv1D layers) of ``mend-original-gpt2.{json,safetensors}``
(its config and ``base.*`` weights, read here and by the test). Run it outside the project's root, so that the
original's ``util``, ``nets`` and ``editor`` modules are the ones imported:

    git clone https://github.com/ChenmienTan/malmen /tmp/malmen-orig      # at 1df295d
    cd /tmp && python /path/to/tests/golden/make_malmen.py --original /tmp/malmen-orig

(the project's .venv serves: torch, transformers, omegaconf, numpy and tqdm are what the code imports).

Patches, all applied from this script (the original's files are not changed):
- ``wandb`` (imported by ``editor/base.py`` to log) is an empty stand-in whose ``log`` does nothing;
- the model is built from its config and the stored weights instead of ``model.make_model`` (``from_pretrained``),
  and then prepared as ``make_model`` does: every parameter frozen except the edited modules' weights;
- everything runs on the CPU (``model_device`` / ``editor_device`` = cpu);
- the network's parameters, which the original initialises so that it is the identity map (B = 0, scale 1, shift 0)
  with lr 1e-6 and lambda 0, are replaced by seeded random values (recorded as ``init.*``), so that every part of
  it acts on the numbers;
- ``clip_grad_norm_`` in ``editor/malmen.py`` is wrapped to record the network's gradients before it clips them
  (``grad.*``), and ``MALMEN.predict_param_shifts`` to record the update it returns (``shift.*``).
Nothing else is changed: ``BaseEditor.train`` runs one meta-step as it is (``cache``: the hooks of
``util.TracerDict``, ``util.cross_entropy``, the normalisation ``nets.RunningMeanStd``; ``predict_param_shifts``: the
network ``nets.MALMENNet`` and the solve; the post-edit losses on the rephrasings and the unrelated inputs
(``util.kl_div``) back-propagated to the edited weights; ``update_hypernet``: the gradient through the solve), with the
batching of ``data.base.BaseDataset.collate_fn`` (each role's examples sorted by length, cut into tuples of
``data.batch_size``, padded).

The run: one meta-step of 8 edits (seeded random prompts of 3-7 tokens, targets of 2-5 tokens, rephrasings of
3-7 tokens with the same target, unrelated inputs of 4-9 tokens whose every position is scored), ``data.batch_size``
4 (two tuples per role), ``editor.batch_size`` 10 (the rows go through the network in several chunks), rank 8 (the
original's 1920 changes no code path and would make the file 30 MB), 2 blocks, ``loc_coef`` 1.
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
import transformers
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ORIGINAL_COMMIT = "1df295d"
MODULES = [
    "transformer.h.1.mlp.c_fc",
    "transformer.h.1.mlp.c_proj",
    "transformer.h.2.mlp.c_fc",
    "transformer.h.2.mlp.c_proj",
]
SEED, N_EDITS, TUPLE_SIZE, NET_CHUNK, RANK, N_BLOCKS = 0, 8, 4, 10, 8, 2


def base_model() -> torch.nn.Module:
    meta = json.loads((HERE / "mend-original-gpt2.json").read_text())
    tensors = load_file(str(HERE / "mend-original-gpt2.safetensors"))
    config_cls = transformers.AutoConfig.for_model(meta["model_config"]["model_type"]).__class__
    model = getattr(transformers, meta["model_class"])(config_cls.from_dict(meta["model_config"]))
    base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()
    return model


def make_edits(vocab: int, n: int = N_EDITS) -> list:
    """``n`` (prompt, target, rephrasing, unrelated input) token-id lists, seeded."""
    g = torch.Generator().manual_seed(SEED)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [{"prompt": ids(3, 7), "target": ids(2, 5), "rephrase": ids(3, 7), "unrelated": ids(4, 9)} for _ in range(n)]


def original_tuple(prompt: list, target: list) -> dict:
    """One example as the original's ``ZSREDataset.tok_tuples`` lays it out for GPT-2: the prompt and the target but
    its last token as inputs, the labels shifted (position i predicts labels[i])."""
    ids = torch.tensor([prompt + target[:-1]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([[-100] * (len(prompt) - 1) + target]),
    }


def unrelated_tuple(ids: list) -> dict:
    """An unrelated input whose every position is scored by ``util.kl_div`` (labels not -100 everywhere)."""
    t = torch.tensor([ids])
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": torch.zeros_like(t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", required=True, type=Path, help="a checkout of ChenmienTan/malmen")
    args = parser.parse_args()
    sys.path.insert(0, str(args.original.resolve()))
    wandb = types.ModuleType("wandb")  # a stand-in that logs nothing (transformers looks for a spec)
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.log = lambda *a, **k: None
    sys.modules["wandb"] = wandb
    import editor.malmen  # noqa: E402  (the original's code: importable only once its folder is on the path)
    from data.base import BaseDataset  # noqa: E402

    torch.manual_seed(SEED)
    model = base_model()
    for p in model.parameters():  # as model.make_model
        p.requires_grad = False
    for name in MODULES:
        model.get_submodule(name).weight.requires_grad = True
    edits = make_edits(model.config.vocab_size)

    cache = tempfile.mkdtemp(prefix="malmen-cache-")
    config = OmegaConf.create(
        {
            "model_device": "cpu",
            "editor_device": "cpu",
            "model": {"name_or_path": "tiny-gpt2", "edit_modules": MODULES},
            "editor": {
                "name": "malmen",
                "rank": RANK,
                "n_blocks": N_BLOCKS,
                "lr": 1e-6,
                "meta_lr": 1e-5,
                "loc_coef": 1,
                "max_grad_norm": 1,
                "n_epochs": 1,
                "batch_size": NET_CHUNK,
                "token": "ans",
                "cache_dir": cache,
                "load_checkpoint": False,
            },
            "data": {"name": "golden", "n_edits": N_EDITS, "batch_size": TUPLE_SIZE},
        }
    )
    ed = editor.malmen.MALMEN(config, model)

    out = {}
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():  # a network that is not the identity, with step sizes and ridges of its own
        for name, p in ed.net.named_parameters():
            if name.endswith("lr.weight"):
                p.copy_(1e-4 * (1 + torch.rand(p.shape, generator=g)))
            elif name.endswith("lamda.weight"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    for name, p in ed.net.named_parameters():
        out[f"init.{name}"] = p.detach().clone()

    predict = ed.predict_param_shifts

    def recorded_predict():
        shifts = predict()
        for m, s in shifts.items():
            out[f"shift.{m}"] = s.detach().clone()
        for key, net in ed.net.items():
            for buf in ("n", "mean", "var", "std"):
                out[f"stats.{key}.{buf}"] = getattr(net.normalizer, buf).detach().clone()
        return shifts

    ed.predict_param_shifts = recorded_predict
    clip = editor.malmen.clip_grad_norm_

    def recorded_clip(params, max_norm):
        for name, p in ed.net.named_parameters():
            if p.grad is not None:
                out[f"grad.{name}"] = p.grad.detach().clone()
        return clip(params, max_norm)

    editor.malmen.clip_grad_norm_ = recorded_clip

    loader = BaseDataset.__new__(BaseDataset)  # its collate_fn only: the data come from make_edits
    loader.config, loader.device = config.data, "cpu"
    items = [
        {
            "edit_tuples": original_tuple(e["prompt"], e["target"]),
            "equiv_tuples": original_tuple(e["rephrase"], e["target"]),
            "unrel_tuples": unrelated_tuple(e["unrelated"]),
        }
        for e in edits
    ]
    ed.train([loader.collate_fn(items)])

    meta = {
        "original_code": f"https://github.com/ChenmienTan/malmen at {ORIGINAL_COMMIT}",
        "base_model": "mend-original-gpt2.json / .safetensors (base.*)",
        "inner_params": [f"{m}.weight" for m in MODULES],
        "rank": RANK,
        "n_blocks": N_BLOCKS,
        "chunk_size": TUPLE_SIZE,
        "net_chunk": NET_CHUNK,
        "loc_coef": 1.0,
        "edits": edits,
    }
    (HERE / "malmen-gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / "malmen-gpt2.safetensors"))
    print(f"wrote malmen-gpt2.{{json,safetensors}}: {len(out)} tensors")


if __name__ == "__main__":
    main()
