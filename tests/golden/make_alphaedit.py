"""Golden values of the AUTHORS' AlphaEdit code (jianghoucheng/AlphaEdit) on a tiny random GPT-2
(tests/test_locate_edit.py).

Not run by the tests; writes ``tests/golden/alphaedit-gpt2.{json,safetensors}``. Set up as make_rome.py says, with
the AlphaEdit checkout (at f5248d3) exported to /tmp/orig_alphaedit:

    cd /tmp/orig_alphaedit && /tmp/orig_venv/bin/python /path/to/tests/golden/make_alphaedit.py --tokenizer <dir>

Patches, none to the algorithm: ``datasets`` an empty stand-in; ``"cuda"`` -> ``"cpu"`` and ``.cuda()`` ->
``.cpu()`` in the exported ``AlphaEdit/``, ``rome/`` and ``util/`` files; ``AlphaEdit.AlphaEdit_main.layer_stats``
returns ``locate_setup.fixed_second_moment`` as its ``mom2``; ``CONTEXT_TEMPLATES_CACHE`` set to
``locate_setup.MEMIT_TEMPLATES``; the model built by ``locate_setup.tiny_gpt2``. The projection P is the authors'
``get_project`` (``experiments/evaluate.py``), taken out of that file and run as it is (importing the file would
load every data set of the benchmark); ``cache_c`` starts at zero as ``evaluate.py`` makes it.
The run, as the authors' sequential evaluation: ``apply_AlphaEdit_to_model`` on the first two requests of
``locate_setup.REQUESTS`` at once (layers 0 and 1, ``v_loss_layer`` 2, 8 steps), then on the third with the
``cache_c`` the first returned; both edited weights and ``cache_c`` recorded after each.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import types
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import locate_setup as S  # noqa: E402  (the shared setup beside this file)

ORIGINAL_COMMIT = "f5248d3"


def authors_get_project(root: Path, get_cov):
    """``get_project`` of the authors' experiments/evaluate.py, compiled alone with the names it uses."""
    tree = ast.parse((root / "experiments" / "evaluate.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_project")
    namespace = {"torch": torch, "get_cov": get_cov}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "evaluate.py", "exec"), namespace)
    return namespace["get_project"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args()
    root = Path.cwd()
    S.cpu_only(root, ["AlphaEdit", "rome", "util"])
    sys.path.insert(0, str(root))
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
    import AlphaEdit.AlphaEdit_main as main_module
    from AlphaEdit import AlphaEditHyperParams, apply_AlphaEdit_to_model

    tok = S.gpt2_tokenizer(args.tokenizer)
    model = S.tiny_gpt2(len(tok))
    main_module.layer_stats = S.stub_stats(S.fixed_second_moment())
    main_module.CONTEXT_TEMPLATES_CACHE = [list(g) for g in S.MEMIT_TEMPLATES]
    hp = AlphaEditHyperParams(
        model_name="gpt2-tiny", layers=list(S.LAYERS), layer_selection="all", fact_token="subject_last",
        v_num_grad_steps=S.SETTINGS["v_num_grad_steps"], v_lr=S.SETTINGS["v_lr"], v_loss_layer=2,
        v_weight_decay=S.SETTINGS["v_weight_decay"], clamp_norm_factor=S.MEMIT_CLAMP, kl_factor=S.SETTINGS["kl_factor"],
        mom2_adjustment=True, mom2_update_weight=S.SETTINGS["mom2_update_weight"],
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f",
        lm_head_module="lm_head", mom2_dataset="wikipedia", mom2_n_samples=100, mom2_dtype="float32",
        nullspace_threshold=S.SETTINGS["nullspace_threshold"], L2=S.SETTINGS["L2"],
    )  # fmt: skip
    get_project = authors_get_project(root, main_module.get_cov)
    names = [S.weight_name(layer) for layer in S.LAYERS]
    d_in = model.get_parameter(names[-1]).shape[0]  # Conv1D: (d_in, d_out), evaluate.py's W_out.shape[0] for gpt2
    cache_c = torch.zeros((len(S.LAYERS), d_in, d_in))
    P = torch.zeros((len(S.LAYERS), d_in, d_in))
    for i, layer in enumerate(S.LAYERS):
        P[i, :, :] = get_project(model, tok, layer, hp)
    tensors = {f"base.{n}": model.get_parameter(n).detach().clone() for n in names}
    tensors["P"] = P.clone()
    turns = [S.REQUESTS[:2], S.REQUESTS[2:]]
    for t, group in enumerate(turns, 1):
        requests = [
            {"case_id": i, "prompt": r["prompt"], "subject": r["subject"], "target_new": {"str": r["target"]}}
            for i, r in enumerate(group)
        ]
        model, cache_c = apply_AlphaEdit_to_model(model, tok, requests, hp, cache_c=cache_c, P=P)
        tensors.update({f"after{t}.{n}": model.get_parameter(n).detach().clone() for n in names})
        tensors[f"cache_c{t}"] = cache_c.clone()
    save_file(tensors, str(HERE / "alphaedit-gpt2.safetensors"))
    meta = {
        "original": f"jianghoucheng/AlphaEdit@{ORIGINAL_COMMIT}",
        "transformers": transformers.__version__,
        "weights": names,
        "turns": [[r["subject"] for r in g] for g in turns],
        "settings": {**S.SETTINGS, "clamp_norm_factor": S.MEMIT_CLAMP},
        "templates": S.MEMIT_TEMPLATES,
        "null_space_dims": [int(torch.linalg.matrix_rank(P[i]).item()) for i in range(len(S.LAYERS))],
    }
    (HERE / "alphaedit-gpt2.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", HERE / "alphaedit-gpt2.safetensors")


if __name__ == "__main__":
    main()
