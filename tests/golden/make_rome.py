"""Golden values of the ORIGINAL ROME code (kmeng01/rome) on a tiny random GPT-2 (tests/test_locate_edit.py).

Not run by the tests: it needs the original code and a transformers of its time (its hooks take a block's output
as a tuple, which transformers 5 no longer returns), and writes ``tests/golden/rome-gpt2.{json,safetensors}``:

    git -C <kmeng01/rome checkout> archive HEAD | tar -x -C /tmp/orig_rome          # at 0874014
    python -m venv /tmp/orig_venv && /tmp/orig_venv/bin/pip install transformers==4.44.2 "tokenizers<0.20"
    (torch, numpy, matplotlib, pyyaml from the project's .venv: a .pth file pointing at its site-packages)
    cd /tmp/orig_rome && /tmp/orig_venv/bin/python /path/to/tests/golden/make_rome.py --tokenizer <GPT-2 tokenizer dir>

(the GPT-2 tokenizer directory is what ``models.resolve_model_dir("embedded:gpt2-tokenizer", cache)`` returns.)

Patches, all made here or on the exported copy, none to the algorithm:
- ``datasets`` (imported by ``rome/layer_stats.py`` to download Wikipedia) is an empty stand-in;
- every ``"cuda"`` in the exported ``rome/`` and ``util/`` files becomes ``"cpu"`` (no GPU here);
- ``rome.compute_u.layer_stats`` (Wikipedia statistics, downloaded) returns the fixed second moment of
  ``locate_setup.fixed_second_moment`` as its ``mom2``; ``get_inv_cov`` inverts it as it would the real one;
- ``rome.rome_main.CONTEXT_TEMPLATES_CACHE``, the original's own cache of its sampled context templates, is set to
  ``locate_setup.ROME_TEMPLATES`` (sampling is random; the templates are an input of the test);
- the model is ``locate_setup.tiny_gpt2`` (built from a config, not downloaded).
The run: the three requests of ``locate_setup.REQUESTS`` applied one after another with ``apply_rome_to_model`` on
the model each left (layer 1, ``v_loss_layer`` 2, the published settings but 8 steps); the edited weight is recorded
after each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import locate_setup as S  # noqa: E402  (the shared setup beside this file)

ORIGINAL_COMMIT = "0874014"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    root = Path.cwd()
    S.cpu_only(root, ["rome", "util"])
    sys.path.insert(0, str(root))
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)  # the statistics' download; stubbed below
    import rome.compute_u
    import rome.rome_main
    from rome import ROMEHyperParams, apply_rome_to_model

    tok = S.gpt2_tokenizer(args.tokenizer)
    model = S.tiny_gpt2(len(tok))
    rome.compute_u.layer_stats = S.stub_stats(S.fixed_second_moment())
    rome.rome_main.CONTEXT_TEMPLATES_CACHE = list(S.ROME_TEMPLATES)
    layer = S.LAYERS[-1]
    hp = ROMEHyperParams(
        layers=[layer], fact_token="subject_last", v_num_grad_steps=S.SETTINGS["v_num_grad_steps"],
        v_lr=S.SETTINGS["v_lr"], v_loss_layer=2, v_weight_decay=S.SETTINGS["v_weight_decay"],
        clamp_norm_factor=S.ROME_CLAMP, kl_factor=S.SETTINGS["kl_factor"], mom2_adjustment=True,
        context_template_length_params=[[5, 10], [10, 10]], rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        layer_module_tmp="transformer.h.{}", mlp_module_tmp="transformer.h.{}.mlp",
        attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f", lm_head_module="transformer.wte",
        mom2_dataset="wikipedia", mom2_n_samples=100, mom2_dtype="float32",
    )  # fmt: skip
    name = S.weight_name(layer)
    tensors = {"base": model.get_parameter(name).detach().clone()}
    for t, r in enumerate(S.REQUESTS, 1):
        request = {"prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]}}
        apply_rome_to_model(model, tok, [request], hp)
        tensors[f"after{t}"] = model.get_parameter(name).detach().clone()
    save_file(tensors, str(HERE / "rome-gpt2.safetensors"))
    meta = {
        "original": f"kmeng01/rome@{ORIGINAL_COMMIT}",
        "transformers": transformers.__version__,
        "weight": name,
        "settings": {**S.SETTINGS, "clamp_norm_factor": S.ROME_CLAMP},
        "requests": S.REQUESTS,
        "templates": S.ROME_TEMPLATES,
        "script": subprocess.run(["git", "-C", str(HERE), "log", "-1", "--format=%h"], capture_output=True,
                                 text=True).stdout.strip(),
    }  # fmt: skip
    (HERE / "rome-gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", HERE / "rome-gpt2.safetensors")


if __name__ == "__main__":
    main()
