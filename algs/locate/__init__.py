"""What the locate-then-edit editors (ROME, MEMIT, AlphaEdit: ``algs/rome``, ``algs/memit``, ``algs/alphaedit``)
share. Not an editor itself (no ``EDITOR``): the registry skips it.

This file is torch-free (read while a configuration is validated): the settings every one of them has, their
ranges, and the check of ``model.inner_params`` (the edited weights must be MLP output projections). The machinery
is in ``text.py`` (prompts, context templates, the subject's last token), ``vectors.py`` (keys and the optimised
target vector) and ``editor.py`` (the base class); what they compute is in docs/locate_edit.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from errors import ConfigError
from ranges import COUNT, LOSS_WEIGHT, STEP, Range

# The output projections of a transformer block's MLP, by the module name that ends a weight's name (GPT-2 / GPT-J /
# Llama-style models and GPT-NeoX): the layers whose input is the key these editors write to.
OUTPUT_PROJECTIONS = ("mlp.c_proj", "mlp.down_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.c_proj.linear")


@dataclass
class TargetSettings:
    """The optimisation of the target vector and the key statistics, shared by the three editors. Defaults: the
    published GPT-2 XL hyperparameters (kmeng01/rome hparams/ROME/gpt2-xl.json, kmeng01/memit
    hparams/MEMIT/gpt2-xl.json); each editor's group overrides what differs."""

    v_num_grad_steps: int = 20  # Adam steps on the target vector (the original's v_num_grad_steps)
    v_lr: float = 0.5  # their v_lr
    v_weight_decay: float = 0.5  # weight of |delta| / |v_init|^2 in the loss (their v_weight_decay)
    clamp_norm_factor: float = 4.0  # |delta| <= clamp_norm_factor * |v_init| (their clamp_norm_factor)
    kl_factor: float = 0.0625  # weight of the KL on "<subject> is a" (their kl_factor)
    mom2_n_samples: int = 1000  # corpus passages of the key statistics (theirs: 100,000 Wikipedia texts)


RANGES = {
    "v_num_grad_steps": COUNT,
    "v_lr": STEP,
    "v_weight_decay": LOSS_WEIGHT,
    "clamp_norm_factor": Range(0, 1e6, low_open=True, why="0 leaves the target vector where it is"),
    "kl_factor": LOSS_WEIGHT,
    "mom2_n_samples": COUNT,
}


def check_inner_params(cfg, alg: str, one: bool) -> None:
    """``model.inner_params`` must name MLP output projections (one of them for ROME): the weights these editors
    write to. A ConfigError naming the key and a line that works otherwise."""
    names = list(cfg.model.inner_params)
    bad = [n for n in names if not any(n == f"{p}.weight" or n.endswith(f".{p}.weight") for p in OUTPUT_PROJECTIONS)]
    example = "model.inner_params=[model.layers.12.mlp.down_proj.weight]"
    if bad:
        raise ConfigError(
            f"alg={alg} writes to the output projection of an MLP (the weight whose input is the key), and "
            f"model.inner_params holds {bad}: set it to such weights, e.g. {example} on SmolLM2 "
            f"(docs/locate_edit.md lists the published layers per model)."
        )
    if one and len(names) != 1:
        raise ConfigError(
            f"alg={alg} edits one layer and model.inner_params names {len(names)} weights: give one, e.g. {example} "
            f"(alg=memit spreads an edit over several)."
        )
