"""Golden values of the ORIGINAL MEMIT code (kmeng01/memit) on a tiny random GPT-2 (tests/test_locate_edit.py).

Not run by the tests; writes ``tests/golden/memit-gpt2.{json,safetensors}``. Set up as make_rome.py says, with the
MEMIT checkout (at 80426fd) exported to /tmp/orig_memit:

    cd /tmp/orig_memit && /tmp/orig_venv/bin/python /path/to/tests/golden/make_memit.py --tokenizer <dir>

Patches, none to the algorithm: ``datasets`` an empty stand-in (the statistics' download); ``"cuda"`` -> ``"cpu"`` and
``.cuda()`` -> ``.cpu()`` in the exported ``memit/``, ``rome/`` and ``util/`` files; ``memit.memit_main.layer_stats``
returns ``locate_setup.fixed_second_moment`` as its ``mom2`` (``get_cov`` reads it as it would the real one);
``memit.memit_main.CONTEXT_TEMPLATES_CACHE``, the original's cache of its sampled templates, set to
``locate_setup.MEMIT_TEMPLATES``; the model built by ``locate_setup.tiny_gpt2``.
The run: ``apply_memit_to_model`` on the first two requests of ``locate_setup.REQUESTS`` at once (layers 0 and 1,
``v_loss_layer`` 2, the published settings but 8 steps and ``mom2_update_weight`` 2 for these statistics' scale),
then on the third on the model the first update left; both edited weights recorded after each.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import locate_setup as S  # noqa: E402  (the shared setup beside this file)

ORIGINAL_COMMIT = "80426fd"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    root = Path.cwd()
    S.cpu_only(root, ["memit", "rome", "util"])
    sys.path.insert(0, str(root))
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
    import memit.memit_main
    from memit import MEMITHyperParams, apply_memit_to_model

    tok = S.gpt2_tokenizer(args.tokenizer)
    model = S.tiny_gpt2(len(tok))
    memit.memit_main.layer_stats = S.stub_stats(S.fixed_second_moment())
    memit.memit_main.CONTEXT_TEMPLATES_CACHE = [list(g) for g in S.MEMIT_TEMPLATES]
    hp = MEMITHyperParams(
        layers=list(S.LAYERS), layer_selection="all", fact_token="subject_last",
        v_num_grad_steps=S.SETTINGS["v_num_grad_steps"], v_lr=S.SETTINGS["v_lr"], v_loss_layer=2,
        v_weight_decay=S.SETTINGS["v_weight_decay"], clamp_norm_factor=S.MEMIT_CLAMP, kl_factor=S.SETTINGS["kl_factor"],
        mom2_adjustment=True, mom2_update_weight=S.SETTINGS["mom2_update_weight"],
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f",
        lm_head_module="transformer.wte", mom2_dataset="wikipedia", mom2_n_samples=100, mom2_dtype="float32",
    )  # fmt: skip
    names = [S.weight_name(layer) for layer in S.LAYERS]
    tensors = {f"base.{n}": model.get_parameter(n).detach().clone() for n in names}
    turns = [S.REQUESTS[:2], S.REQUESTS[2:]]
    for t, group in enumerate(turns, 1):
        requests = [
            {"case_id": i, "prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]}}
            for i, r in enumerate(group)
        ]
        apply_memit_to_model(model, tok, requests, hp)
        tensors.update({f"after{t}.{n}": model.get_parameter(n).detach().clone() for n in names})
    save_file(tensors, str(HERE / "memit-gpt2.safetensors"))
    meta = {
        "original": f"kmeng01/memit@{ORIGINAL_COMMIT}",
        "transformers": transformers.__version__,
        "weights": names,
        "turns": [[r["subject"] for r in g] for g in turns],
        "settings": {**S.SETTINGS, "clamp_norm_factor": S.MEMIT_CLAMP},
        "templates": S.MEMIT_TEMPLATES,
    }
    (HERE / "memit-gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", HERE / "memit-gpt2.safetensors")


if __name__ == "__main__":
    main()
