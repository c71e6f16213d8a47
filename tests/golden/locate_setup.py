"""What the golden files of ROME, MEMIT and AlphaEdit (make_rome.py, make_memit.py, make_alphaedit.py) and their test
(tests/test_locate_edit.py) share: the tiny GPT-2, the fixed key statistics, the requests and the context templates.

Everything is built from torch's seeded generator, not stored: the model is a 3-block GPT-2 (32 wide, the GPT-2
vocabulary, eager attention) whose every weight is drawn here, so that the originals' transformers and this
project's build the same model; the key statistics C = Q diag(s) Q^T have half their eigenvalues at 1e-3 (below
AlphaEdit's threshold, so that its null space is 64-dimensional) and half between 0.5 and 2.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
import transformers

D_IN = 128  # the input width of the edited c_proj layers (4 x 32)
LAYERS = (0, 1)  # MEMIT / AlphaEdit; ROME edits the last of them
REQUESTS = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"},
    {"prompt": "{}, who plays the", "subject": "Miles Davis", "target": "violin"},
]
# The context templates, fixed (the originals sample them from the model; here they are inputs).
ROME_TEMPLATES = ["{}", "The weather was fine. {}", "He said that. {}", "In the morning we left. {}"]
MEMIT_TEMPLATES = [["{}"], ["The weather was fine. {}", "Therefore we know. {}", "Because of this. {}"]]
SETTINGS = {  # the published defaults except the covariance weight, on the scale of this model's statistics
    "v_num_grad_steps": 8,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_update_weight": 2.0,
    "nullspace_threshold": 2e-2,
    "L2": 10.0,
}
ROME_CLAMP, MEMIT_CLAMP = 4.0, 0.75


def tiny_gpt2(vocab: int) -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64)
    cfg._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise if p.dim() == 2 else 0.02 * noise)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def fixed_second_moment() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float64))
    s = torch.cat(
        [
            torch.full((D_IN // 2,), 1e-3, dtype=torch.float64),
            0.5 + 1.5 * torch.rand(D_IN // 2, generator=gen, dtype=torch.float64),
        ]
    )
    return ((q * s) @ q.T).float()


def weight_name(layer: int) -> str:
    return f"transformer.h.{layer}.mlp.c_proj.weight"


# -- for the generators (run with the originals' transformers) ---------------------------------------------------
def cpu_only(root: Path, folders) -> None:
    for folder in folders:
        for f in (root / folder).glob("*.py"):
            f.write_text(f.read_text().replace('"cuda"', '"cpu"').replace(".cuda()", ".cpu()"))


def stub_stats(cov: torch.Tensor):
    def layer_stats(*args, **kwargs):
        return types.SimpleNamespace(mom2=types.SimpleNamespace(moment=lambda: cov.clone()))

    return layer_stats


def gpt2_tokenizer(folder: str):
    """GPT-2's fast tokenizer as the originals load it (they slice its batch encodings, which only the fast one
    allows), built from ``vocab.json`` and ``merges.txt`` (this transformers' tokenizers cannot read the newer
    ``tokenizer.json``), EOS as padding as their notebooks set it."""
    tok = transformers.GPT2TokenizerFast(vocab_file=f"{folder}/vocab.json", merges_file=f"{folder}/merges.txt")
    tok.pad_token = tok.eos_token
    return tok
