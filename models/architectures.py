"""``+model=hf``: the model class, kind, embedding module and edited weights of a model, inferred from its config.

The architectures this project supports are listed in :data:`ARCHITECTURES` by ``model_type`` (the key of a
model's ``config.json``), with the names their ``config/model/*.yaml`` files use: the model class, what kind of
model it is, its input embedding module, its stacks of blocks and the MLP weights of one block. The default edited
weights are the MLP weights of the last blocks of each stack: three for a decoder-only model or an encoder (as MEND
edits distilGPT-2, GPT-J and BERT), two of the encoder and two of the decoder for an encoder-decoder (as MEND edits
T5 and BART).

:func:`infer_model_config` fills the keys of ``model`` that ``config/model/hf.yaml`` leaves to inference
(``class_name: auto``, ``kind: auto``, ``inner_params: []``, ``embedding_module: null``) from the model's config
alone, before any weight is loaded; keys given on the command line are kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import transformers

from errors import ModelLoadError

from .loading import _load, _model_hint

LOG = logging.getLogger("models")

AUTO = "auto"  # model.class_name / model.kind: inferred from the model's config


@dataclass(frozen=True)
class Architecture:
    class_name: str
    kind: str  # causal_lm | seq2seq | classifier
    embedding_module: str
    # (name of block i with "{}" for i, the config key holding the number of blocks), one per stack of blocks
    stacks: Tuple[Tuple[str, str], ...]
    mlp: Tuple[str, ...]  # the MLP weights of one block, relative to the block (or to the stack's MLP module)
    n_edited: int  # blocks edited per stack by default: the last n_edited


_LLAMA_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def _llama_like(class_name: str) -> Architecture:
    return Architecture(class_name, "causal_lm", "model.embed_tokens", (("model.layers.{}", "num_hidden_layers"),),
                        _LLAMA_MLP, 3)  # fmt: skip


ARCHITECTURES: Dict[str, Architecture] = {
    "gpt2": Architecture("GPT2LMHeadModel", "causal_lm", "transformer.wte", (("transformer.h.{}", "n_layer"),),
                         ("mlp.c_fc.weight", "mlp.c_proj.weight"), 3),
    "gpt_neo": Architecture("GPTNeoForCausalLM", "causal_lm", "transformer.wte", (("transformer.h.{}", "num_layers"),),
                            ("mlp.c_fc.weight", "mlp.c_proj.weight"), 3),
    "gptj": Architecture("GPTJForCausalLM", "causal_lm", "transformer.wte", (("transformer.h.{}", "n_layer"),),
                         ("mlp.fc_in.weight", "mlp.fc_out.weight"), 3),
    "llama": _llama_like("LlamaForCausalLM"),
    "mistral": _llama_like("MistralForCausalLM"),
    "qwen2": _llama_like("Qwen2ForCausalLM"),
    "gemma2": _llama_like("Gemma2ForCausalLM"),
    # T5: the feed-forward sub-layer is layer.1 of an encoder block and layer.2 of a decoder block; its weights
    # depend on the activation (T5.1.1's gated-gelu: wi_0, wi_1, wo; the original T5's relu: wi, wo), see _t5_mlp.
    "t5": Architecture("T5ForConditionalGeneration", "seq2seq", "shared",
                       (("encoder.block.{}.layer.1.DenseReluDense", "num_layers"),
                        ("decoder.block.{}.layer.2.DenseReluDense", "num_decoder_layers")), (), 2),
    "bart": Architecture("BartForConditionalGeneration", "seq2seq", "model.shared",
                         (("model.encoder.layers.{}", "encoder_layers"), ("model.decoder.layers.{}", "decoder_layers")),
                         ("fc1.weight", "fc2.weight"), 2),
    # BERT is loaded as models.BertClassifier (the fc experiment's fact-checker), its encoder's weights under "model."
    "bert": Architecture("BertModel", "classifier", "model.embeddings.word_embeddings",
                         (("model.encoder.layer.{}", "num_hidden_layers"),),
                         ("intermediate.dense.weight", "output.dense.weight"), 3),
}  # fmt: skip


def _t5_mlp(config) -> Tuple[str, ...]:
    gated = getattr(config, "is_gated_act", None)
    if gated is None:
        gated = str(getattr(config, "feed_forward_proj", "relu")).startswith("gated")
    return ("wi_0.weight", "wi_1.weight", "wo.weight") if gated else ("wi.weight", "wo.weight")


def default_edited_weights(model_type: str, config) -> Tuple[List[str], str]:
    """(the names of the default edited weights, a short description of them) for a config of ``model_type``."""
    arch = ARCHITECTURES[model_type]
    mlp = _t5_mlp(config) if model_type == "t5" else arch.mlp
    names: List[str] = []
    parts: List[str] = []
    for block, key in arch.stacks:
        n_blocks = getattr(config, key, None)
        if not isinstance(n_blocks, int) or n_blocks < 1:
            raise ModelLoadError(
                f"the config of this {model_type} model has no usable {key} ({n_blocks!r}), so the edited blocks "
                f"cannot be inferred; set model.inner_params=[...] to the weights to edit."
            )
        first = max(0, n_blocks - arch.n_edited)
        names += [f"{block.format(i)}.{w}" for i in range(first, n_blocks) for w in mlp]
        span = f"{first}" if first == n_blocks - 1 else f"{first}-{n_blocks - 1}"
        parts.append(f"{block.format('<i>')}.{{{','.join(w.removesuffix('.weight') for w in mlp)}}} for i in {span} "
                     f"of {n_blocks}")  # fmt: skip
    return names, "; ".join(parts)


def infer_model_config(model_cfg, cache_dir: str) -> Dict[str, Any]:
    """The keys of ``model`` that it leaves to inference, filled from the model's config (read from a local
    directory, the HuggingFace cache or the hub; no weights are loaded), and logged. A model of an architecture not
    in :data:`ARCHITECTURES` or a config that cannot be read raises a :class:`ModelLoadError` saying what to do."""
    name = model_cfg.name
    config = _load("model", transformers.AutoConfig, name, cache_dir, _model_hint(name, "causal_lm"))
    model_type = getattr(config, "model_type", None)
    arch: Optional[Architecture] = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ModelLoadError(
            f"model.name={name!r} is a {model_type!r} model, whose class and edited weights +model=hf cannot infer "
            f"(it knows {', '.join(sorted(ARCHITECTURES))}). Set model.class_name, model.kind and model.inner_params "
            f"on the command line, or write config/model/<name>.yaml (docs/experiments.md, 'Using your own model or "
            f"data')."
        )
    filled: Dict[str, Any] = {}
    if model_cfg.class_name == AUTO:
        filled["class_name"] = arch.class_name
    if model_cfg.kind == AUTO:
        filled["kind"] = arch.kind
    if model_cfg.embedding_module is None:
        filled["embedding_module"] = arch.embedding_module
    described = "as given"
    if not list(model_cfg.inner_params):
        filled["inner_params"], described = default_edited_weights(model_type, config)
    LOG.info(
        "+model=hf: %s is a %s model: model.class_name=%s, model.kind=%s; edited weights (model.inner_params): %s",
        name,
        model_type,
        filled.get("class_name", model_cfg.class_name),
        filled.get("kind", model_cfg.kind),
        described,
    )
    return filled
