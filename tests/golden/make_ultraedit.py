"""Golden values of the AUTHORS' UltraEdit code (XiaojieGu/UltraEdit) on tiny random models (tests/test_ultraedit.py).

Not run by the tests: it needs the authors' code checked out, and writes ``tests/golden/ultraedit-<arch>.{json,
safetensors}``. The base models are the tiny random GPT-2 (Conv1D layers) and GPT-Neo (nn.Linear layers) of
``mend-original-<arch>.{json,safetensors}`` (their config and ``base.*`` weights, read here and by the test). Run it
outside the project's root, so that the authors' ``util``, ``nets``, ``model``, ``editor`` and ``data`` modules are
the ones imported:

    git clone https://github.com/XiaojieGu/UltraEdit /tmp/ultraedit-orig      # at 0beb222
    cd /tmp && python /path/to/tests/golden/make_ultraedit.py --original /tmp/ultraedit-orig

(the project's .venv serves: torch, transformers, omegaconf, numpy, tqdm and wandb are what the code imports).

Patches, all applied from this script (the authors' files are not changed):
- ``util.py`` imports ``nltk``, which it never uses on this path and which is not installed: an empty module stands
  in for it;
- ``editor/base.py``'s ``BaseEditor.__init__`` loads a tokenizer from ``config.model.name_or_path`` (the hub); the
  editor never uses it here (the batches are token ids), so ``AutoTokenizer`` there is replaced by a stub;
- the model is built from its config and the stored weights instead of ``model.make_model`` (``from_pretrained``),
  and then prepared as ``make_model`` does: every parameter frozen except the edited modules' weights;
- everything runs on the CPU (``model_device`` / ``editor_device`` = cpu).
Nothing else is changed: the editor (``editor/ultraedit.py``: ``ULTRAEDIT.cache``, ``predict_param_shifts``), its
normalisation (``nets.RunningMeanStd``), the hooks (``util.TracerDict``), the loss (``util.cross_entropy``),
``BaseEditor.edit_model`` and the batching (``data.base.BaseDataset.collate_fn``: edits sorted by length, cut into
tuples of ``dataset.batch_size``, padded) run as they are, one turn per batch as ``BaseEditor.sequential_valid``
does.

The run: 3 turns of 4 edits each (seeded random prompts of 3-7 tokens and targets of 8-12 tokens, so that the
32-wide layers see at least 32 target positions per turn and the 128-wide ones fewer), ``dataset.batch_size`` 2 (two
tuples per turn), ``editor.lr`` 1e-4 (the authors' 1e-6 moves these tiny models' weights too little for the turns
to act on each other; lr only scales the target shift), the other settings the authors' defaults. Recorded after each
turn: the edited weights (``after<t>.<param>``) and every normaliser's buffers (``stats<t>.<shape>.<n|mean|var|std>``).
"""

from __future__ import annotations

import argparse
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
AUTHORS_COMMIT = "0beb222559b01c6dc025aede801c1fc496ec2920"
# arch -> (the edited modules, seed)
CASES = {
    "gpt2": (
        [
            "transformer.h.1.mlp.c_fc",
            "transformer.h.1.mlp.c_proj",
            "transformer.h.2.mlp.c_fc",
            "transformer.h.2.mlp.c_proj",
        ],
        0,
    ),
    "gptneo": (["transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj"], 1),
}
N_TURNS, N_EDITS, TUPLE_SIZE, LR = 3, 4, 2, 1e-4


def base_model(arch: str) -> torch.nn.Module:
    meta = json.loads((HERE / f"mend-original-{arch}.json").read_text())
    tensors = load_file(str(HERE / f"mend-original-{arch}.safetensors"))
    config_cls = transformers.AutoConfig.for_model(meta["model_config"]["model_type"]).__class__
    model = getattr(transformers, meta["model_class"])(config_cls.from_dict(meta["model_config"]))
    base = {k[len("base.") :]: v for k, v in tensors.items() if k.startswith("base.")}
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()
    return model


def make_edits(seed: int, vocab: int) -> list:
    """N_TURNS turns of N_EDITS (prompt ids, target ids), seeded."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    return [[(ids(3, 7), ids(8, 12)) for _ in range(N_EDITS)] for _ in range(N_TURNS)]


def authors_item(prompt: list, target: list) -> dict:
    """One edit as the authors' ``ZSREDataset.tok_tuples`` lays it out: the prompt and the target but its last token
    as inputs, the labels shifted (position i predicts labels[i])."""
    ids = torch.tensor([prompt + target[:-1]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([[-100] * (len(prompt) - 1) + target]),
    }


def run(arch: str, original: Path) -> None:
    modules, seed = CASES[arch]
    sys.path.insert(0, str(original))
    sys.modules.setdefault("nltk", types.ModuleType("nltk"))
    import editor.base  # noqa: E402  (the authors' code: importable only once its folder is on the path)
    from data.base import BaseDataset  # noqa: E402
    from editor.ultraedit import ULTRAEDIT  # noqa: E402

    editor.base.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)

    torch.manual_seed(seed)
    model = base_model(arch)
    for p in model.parameters():  # as model.make_model
        p.requires_grad = False
    for name in modules:
        model.get_submodule(name).weight.requires_grad = True
    vocab = model.config.vocab_size
    turns = make_edits(seed, vocab)

    cache = tempfile.mkdtemp(prefix="ultraedit-cache-")
    config = OmegaConf.create(
        {
            "num_seq": N_TURNS,
            "model_device": "cpu",
            "editor_device": "cpu",
            "model": {"name": f"tiny-{arch}", "name_or_path": f"tiny-{arch}", "edit_modules": modules},
            "editor": {"name": "ultraedit", "lr": LR, "batch_size": 128, "token": "ans", "cache_dir": cache},
            "dataset": {"name": "golden", "n_edits": N_EDITS, "batch_size": TUPLE_SIZE, "num_seq": N_TURNS},
        }
    )
    ed = ULTRAEDIT(config, model)
    loader = BaseDataset.__new__(BaseDataset)  # its collate_fn only: the data come from make_edits
    loader.config, loader.device = config.dataset, "cpu"

    out = {}
    for t, turn in enumerate(turns):
        tuples = loader.collate_fn([{"edit_tuples": authors_item(p, y)} for p, y in turn])
        ed.cache(tuples["edit_tuples"])  # as BaseEditor.sequential_valid: cache, solve, apply
        ed.edit_model(ed.predict_param_shifts(), False)
        for name in modules:
            out[f"after{t}.{name}.weight"] = model.get_submodule(name).weight.detach().clone()
        for shape, norm in ed.lifelong_normalizer.items():
            key = "x".join(shape.strip("()").replace(" ", "").split(","))
            for buf in ("n", "mean", "var", "std"):
                out[f"stats{t}.{key}.{buf}"] = getattr(norm, buf).detach().clone()

    meta = {
        "authors_code": f"https://github.com/XiaojieGu/UltraEdit at {AUTHORS_COMMIT}",
        "base_model": f"mend-original-{arch}.json / .safetensors (base.*)",
        "inner_params": [f"{m}.weight" for m in modules],
        "lr": LR,
        "ridge": 1.0,
        "chunk_size": TUPLE_SIZE,
        "turns": [[{"prompt": p, "target": y} for p, y in turn] for turn in turns],
    }
    (HERE / f"ultraedit-{arch}.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in out.items()}, str(HERE / f"ultraedit-{arch}.safetensors"))
    print(f"wrote ultraedit-{arch}.{{json,safetensors}}: {len(out)} tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--original", required=True, type=Path, help="a checkout of XiaojieGu/UltraEdit")
    parser.add_argument("--arch", choices=sorted(CASES), nargs="*", default=sorted(CASES))
    args = parser.parse_args()
    for arch in args.arch:
        run(arch, args.original.resolve())


if __name__ == "__main__":
    main()
