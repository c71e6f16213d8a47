"""Loading models and tokenizers from a local directory, the local HuggingFace cache or the hub.

:func:`get_model` and :func:`get_tokenizer` resolve ``embedded:<name>`` through :mod:`models.embedded`, then try
a local directory, the local cache (no network) and the hub, after one short probe of the hub so that an offline
machine fails at once. Every failure raises :class:`ModelLoadError` with a message that says how to run offline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
import transformers

from errors import ModelLoadError
from hub import hub_unreachable_reason as _hub_unreachable_reason  # under this name for models/__init__.py

from .classifier import as_classifier
from .common import _one_line, _quiet_progress_bars
from .embedded import resolve_model_dir

LOG = logging.getLogger("models")  # one logger for the package: its log lines name "models", whichever file writes


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def _resolve_class(class_name: str, key: str):
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
        try:
            config_dict, _ = transformers.PretrainedConfig.get_config_dict(source, local_files_only=local_files_only)
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
