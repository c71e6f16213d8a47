"""What the locate-then-edit editors (ROME, MEMIT, AlphaEdit: ``algs/rome``, ``algs/memit``, ``algs/alphaedit``)
share. Not an editor itself (no ``EDITOR``): the registry skips it.

This file is torch-free (read while a configuration is validated): the settings every one of them has, their
ranges, which weights a run edits (:func:`resolve_locate`: the model config's ``locate`` block, ``<alg>.layers`` or
an explicit ``model.inner_params``) and the check of ``model.inner_params`` (the edited weights must be MLP output
projections). The machinery is in ``text.py`` (prompts, context templates, the subject's last token), ``vectors.py``
(keys and the optimised target vector) and ``editor.py`` (the base class); what they compute is in
docs/locate_edit.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from errors import ConfigError
from ranges import COUNT, LOSS_WEIGHT, STEP, Range

# The output projections of a transformer block's MLP, by the module name that ends a weight's name (GPT-2 / GPT-J /
# Llama-style models and GPT-NeoX): the layers whose input is the key these editors write to.
OUTPUT_PROJECTIONS = ("mlp.c_proj", "mlp.down_proj", "mlp.fc_out", "mlp.dense_4h_to_h", "mlp.c_proj.linear")


@dataclass
class TargetSettings:
    """The edited blocks, the optimisation of the target vector and the key statistics, shared by the three editors.
    Defaults: the published GPT-2 XL hyperparameters (kmeng01/rome hparams/ROME/gpt2-xl.json, kmeng01/memit
    hparams/MEMIT/gpt2-xl.json); each editor's group overrides what differs, a model config's ``locate`` block what
    the originals publish for that model."""

    # The blocks whose MLP output projection is edited, lowest first (ROME: one); null: the model config's
    # model.locate.<alg>.layers. Named weights instead: model.inner_params=[...] (not both).
    layers: Optional[List[int]] = None
    v_num_grad_steps: int = 20  # Adam steps on the target vector (the original's v_num_grad_steps)
    v_lr: float = 0.5  # their v_lr
    v_weight_decay: float = 0.5  # weight of |delta| / |v_init|^2 in the loss (their v_weight_decay)
    clamp_norm_factor: float = 4.0  # |delta| <= clamp_norm_factor * |v_init| (their clamp_norm_factor)
    kl_factor: float = 0.0625  # weight of the KL on "<subject> is a" (their kl_factor)
    mom2_n_samples: int = 1000  # corpus passages of the key statistics (theirs: 100,000 Wikipedia texts)


@dataclass
class BatchedTargetSettings(TargetSettings):
    """MEMIT's and AlphaEdit's: every request of an edit is optimised on the same model, so several can share a pass."""

    # Requests whose target vectors are optimised together in one batched pass. 1: one at a time, as the originals.
    # More: each request still its own delta, loss, stop and clamp (the same vectors to float rounding), in fewer,
    # larger passes: faster where a pass is latency-bound (a GPU), little gain on a CPU (docs/locate_edit.md).
    target_batch: int = 1


RANGES = {
    "v_num_grad_steps": COUNT,
    "v_lr": STEP,
    "v_weight_decay": LOSS_WEIGHT,
    "clamp_norm_factor": Range(0, 1e6, low_open=True, why="0 leaves the target vector where it is"),
    "kl_factor": LOSS_WEIGHT,
    "mom2_n_samples": COUNT,
}

BATCHED_RANGES = {**RANGES, "target_batch": COUNT}

HELP = {"layers": "blocks whose MLP output projection it edits, e.g. [6] (null: the model file's)"}


def resolve_locate(cfg, alg: str, given: Collection[str]) -> None:
    """Set ``cfg.model.inner_params`` to the weights ``alg`` edits, and its group's keys to the model's published
    settings, unless the command line gave them (``given``: the dotted keys it set).

    The weights: ``model.inner_params`` as given on the command line; else the output projections of the blocks
    ``<alg>.layers`` names, or else those of the model config's ``locate.<alg>.layers``, each spelled by
    ``locate.weight`` (``model.layers.{}.mlp.down_proj.weight``). Every model file sets ``model.inner_params`` to
    MEND's weights, so only the command line tells that a user chose them. The other keys of ``locate.<alg>``
    (GPT-J's ``v_num_grad_steps: 25``) set the group's keys the command line leaves alone. A ConfigError, one line
    naming the keys, where the layers cannot be found or both ways of naming them are given."""
    if OmegaConf.is_missing(cfg, "model") or OmegaConf.select(cfg, "model") is None:
        return  # no +model=: validate_config says how to choose one
    locate = OmegaConf.select(cfg, "model.locate")
    published = _published(locate, alg)
    for key, value in published.items():
        if key not in cfg[alg]:
            raise ConfigError(
                f"model.locate.{alg}.{key}: not a key of alg={alg}'s settings ({', '.join(sorted(cfg[alg]))})."
            )
        if key != "layers" and f"{alg}.{key}" not in given:
            try:
                OmegaConf.update(cfg, f"{alg}.{key}", value, merge=False)
            except OmegaConfBaseException as e:
                raise ConfigError(f"model.locate.{alg}.{key}={value!r}: {str(e).splitlines()[0]}") from None
    layers = cfg[alg].layers
    example = f"{alg}.layers=[6]" if alg == "rome" else f"{alg}.layers=[4,5,6,7,8]"
    if "model.inner_params" in given:
        if layers is not None:
            raise ConfigError(
                f"{alg}.layers={list(layers)} and model.inner_params both name the weights alg={alg} edits: give "
                f"one ({alg}.layers: blocks, their MLP output projections; model.inner_params: weight names)."
            )
        return
    weight = locate.get("weight") if locate is not None else None
    has_weight = isinstance(weight, str) and "{}" in weight
    names = "model.inner_params=[...] (the weights of the blocks' MLP output projections)"
    if layers is None:
        layers = published.get("layers")
        if layers is None:
            choose = f"{example} (blocks) or {names}" if has_weight else names
            without = "" if has_weight else f", nor a model.locate.weight by which {alg}.layers=[...] names blocks"
            raise ConfigError(
                f"alg={alg} needs the layers it edits and the model file gives none (no model.locate.{alg}.layers"
                f"{without}): give {choose}; docs/locate_edit.md lists the published layers."
            )
    if not has_weight:
        raise ConfigError(
            f"{alg}.layers={list(layers)}: the model file has no model.locate.weight (a block's MLP output projection "
            f"with {{}} for the block, e.g. model.layers.{{}}.mlp.down_proj.weight) to name them by: give {names}."
        )
    if not layers:
        raise ConfigError(f"{alg}.layers=[]: name at least one block, e.g. {example}.")
    cfg.model.inner_params = [weight.format(int(i)) for i in layers]


def _published(locate, alg: str) -> dict:
    """The model config's ``locate.<alg>`` entry as a dict (empty without one); a ConfigError naming the key for
    an entry that is not a mapping of ``layers`` (a list of block numbers) and keys of the editor's group."""
    entry = locate.get(alg) if locate is not None else None
    if entry is None:
        return {}
    if not OmegaConf.is_dict(entry):
        raise ConfigError(f"model.locate.{alg}: expected a mapping (layers: [...] and settings), got {entry!r}.")
    entry = OmegaConf.to_container(entry, resolve=True)
    layers = entry.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(i, int) for i in layers)):
        raise ConfigError(f"model.locate.{alg}.layers={layers!r}: expected a list of block numbers, e.g. [6].")
    return entry


def check_inner_params(cfg, alg: str, one: bool) -> None:
    """``model.inner_params`` must name MLP output projections (one of them for ROME): the weights these editors
    write to. A ConfigError naming the key and a line that works otherwise."""
    names = list(cfg.model.inner_params)
    bad = [n for n in names if not any(n == f"{p}.weight" or n.endswith(f".{p}.weight") for p in OUTPUT_PROJECTIONS)]
    example = "model.inner_params=[model.layers.12.mlp.down_proj.weight]"
    if bad:
        raise ConfigError(
            f"alg={alg} writes to the output projection of an MLP (the weight whose input is the key), and "
            f"model.inner_params holds {bad}: set it to such weights, e.g. {example} on SmolLM2, or name blocks "
            f"with {alg}.layers=[...] (docs/locate_edit.md lists the published layers per model)."
        )
    if one and len(names) != 1:
        raise ConfigError(
            f"alg={alg} edits one layer and model.inner_params names {len(names)} weights: give one, e.g. "
            f"{alg}.layers=[6] or {example} (alg=memit spreads an edit over several)."
        )
