"""Train or evaluate an editor.

python -m run +alg=<editor> +experiment=<experiment> +model=<model>   # an editor of algs/, trained and evaluated
python -m run +alg=<editor> +experiment=gen +model=distilgpt2 data.n_edits=5 batch_size=6 val_batch_size=6
python -m run +alg=<editor> +experiment=gen +model=smollm2 eval_only=True archive=outputs/<run>
python -m run +alg=<editor> +experiment=gen +model=smollm2 resume=outputs/<run>   # continue an interrupted run
torchrun --nproc_per_node=4 -m run +alg=<editor> +experiment=gen +model=smollm2    # 4 processes (GPUs), DDP
python -m run --help   # the config groups and their files, the frequently used keys, examples (see usage())

(the editors and experiments: config/alg/ and config/experiment/; the README's commands run each of them.) An
editor with nothing to train is evaluated directly.

Exit status: 0 done; 2 a clear error (bad config, data, model or checkpoint; a loss that stays non-finite; a
checkpoint that cannot be written), logged as one line; 128 + the signal number after SIGINT / SIGTERM, once
the resume point checkpoints/last.pt is written.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from algs import ALGS, check_shapes, editor_class, settings_help
from config_schema import (
    CONFIG_DIR,
    GROUPS,
    Config,
    ModelConfig,
    check_command_line,
    check_known_keys,
    group_options,
    register_configs,
    resolve_config,
    validate_config,
)
from data_classes import DATASETS, check_model_kind, dataset_class
from errors import ConfigError, TrainingInterrupted, UserError

LOG = logging.getLogger("run")


def run_device(name: str):
    """The torch device ``device=<name>`` asks for; one this machine lacks (``cuda`` without CUDA) is a
    :class:`errors.ConfigError` naming the key, checked before any model or data loads."""
    from utils import resolve_device  # torch: imported after the configuration is checked

    try:
        return resolve_device(name)
    except RuntimeError as e:  # CUDA asked for where there is none, or a name torch does not know
        raise ConfigError(f"device={name}: {e}".replace(f"device={name!r} was asked for but ", "")) from None


def build(cfg: DictConfig):
    """The frozen base model, its tokenizer, the train and validation edit sets, and an editor factory."""
    # Imported here, as in main_job: a configuration error is reported before torch and transformers load.
    import distributed
    from models import check_inner_params, get_model, get_tokenizer
    from utils import seed_everything

    device = distributed.local_device(run_device(cfg.device))
    seed_everything(cfg.seed)
    cache_dir = os.path.expanduser(cfg.cache_dir)

    # 1. the frozen base model (one replica per process), its tokenizer, and the weights to edit
    with distributed.local_main_first():  # under torchrun, one process per machine fills the model cache
        model = get_model(cfg.model, cache_dir)
    check_inner_params(model, list(cfg.model.inner_params))
    shapes = {name: model.get_parameter(name).shape for name in cfg.model.inner_params}
    for warning in check_shapes(cfg, shapes):  # the editor's settings against the edited weights (a rank, ...)
        LOG.warning("%s", warning)
    tokenizer = get_tokenizer(cfg.model, cache_dir)
    model.to(device)

    # 2. the edit data (built from the model itself on first use for the embedded gen set)
    data_class = dataset_class(cfg.task)
    with distributed.local_main_first():
        datasets = [
            data_class(
                tokenizer,
                cfg.data,
                split,
                seed=cfg.seed,
                cache_dir=cache_dir,
                model=model,
                model_id=cfg.model.name,
                device=device,
            )
            for split in ("train", "validation")
        ]
    LOG.info("Data: %d train and %d validation edits.", len(datasets[0]), len(datasets[1]))

    # 3. the editor (a fresh, untrained one per call)
    editor_cls = editor_class(cfg.alg)
    seed_everything(cfg.seed)

    def make_editor():
        editor = editor_cls(model, cfg)
        editor.attach_training_data(datasets[0])  # for an editor that draws batches at edit time
        return editor.to(device)

    return model, tokenizer, datasets, make_editor


def _overrides() -> list:
    """The command line's Hydra overrides (none outside a Hydra app)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def main_job(cfg: DictConfig, run_dir: str) -> dict:
    # Imported here so that config errors are reported before torch and transformers load.
    import distributed
    from checkpoints import LAST_NAME, load_checkpoint, resume_run_dir
    from evaluation import train_and_evaluate
    from memory import log_estimate
    from trainer import EditTrainer

    # Under torchrun: join the other processes; every rank works in rank 0's run directory.
    dist_env = distributed.init(cfg, distributed.local_device(run_device(cfg.device)))
    distributed.check_world_size(cfg, dist_env.world_size)
    run_dir = distributed.broadcast_object(run_dir)

    # 0. a checkpoint to resume or to start from must exist, be readable and fit this setting: refuse it early
    if cfg.resume is not None:
        load_checkpoint(cfg.resume, cfg, name=LAST_NAME, key="resume")
        run_dir = resume_run_dir(cfg.resume)
    elif cfg.archive is not None:
        load_checkpoint(cfg.archive, cfg)

    editor_class(cfg.alg).check_config(cfg)
    check_model_kind(cfg)  # the experiment's data set serves this kind of model
    dataset_class(cfg.task).preflight(cfg, _overrides())
    model, _, datasets, make_editor = build(cfg)
    if dist_env.is_main:
        log_estimate(cfg, model, dist_env.world_size)  # what the run will need per device, before it needs it
    trainer = EditTrainer(make_editor, cfg, datasets[0], datasets[1], run_dir)
    try:
        report = train_and_evaluate(trainer)  # train, reload the best editor, evaluate it, write results.json
        distributed.shutdown(wait=True)  # every rank done before any leaves the group
        return report
    finally:
        distributed.shutdown()


def infer_model(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the model keys it leaves to inference (``+model=hf``: ``class_name: auto``, ``kind: auto``,
    ``inner_params: []``, see config/model/hf.yaml) read from the model's config; ``cfg`` itself when it leaves none.
    Unknown keys are refused first, so that a typo is reported before the model's config is read."""
    check_known_keys(cfg)
    if OmegaConf.is_missing(cfg, "model"):
        return cfg  # no +model=: validate_config says how to choose one
    inner = OmegaConf.select(cfg, "model.inner_params")
    auto = "auto" in (OmegaConf.select(cfg, "model.class_name"), OmegaConf.select(cfg, "model.kind"))
    if OmegaConf.select(cfg, "model.name") is None or not (auto or (inner is not None and len(inner) == 0)):
        return cfg  # nothing to infer, or no model named: validate_config says what is missing
    # Imported here: reading a model's config needs transformers, which a run of a model file loads later.
    from models.architectures import infer_model_config

    return OmegaConf.merge(cfg, {"model": infer_model_config(cfg.model, os.path.expanduser(cfg.cache_dir))})


register_configs()


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        cfg = infer_model(cfg)  # +model=hf: the model's class, kind and edited weights, from its config
        resolve_config(cfg, _overrides())  # the keys an editor derives (ROME's weights: the model's locate block)
        validate_config(cfg, algs=ALGS, tasks=DATASETS)
        main_job(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as e:
        _fail(e)
    except TrainingInterrupted as e:
        LOG.warning("%s", e)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        LOG.warning("Interrupted.")
        sys.exit(130)


def _fail(error: Exception) -> None:
    LOG.error("%s", error)
    sys.exit(2)


def _quiet_hydra_on_other_ranks(argv: list) -> list:
    """Under torchrun only rank 0 writes Hydra's run directory (.hydra/, run.log); the other ranks log to stderr
    and take rank 0's directory at start (distributed.init), so no rank creates a second, timestamped one."""
    if int(os.environ.get("RANK", "0")) == 0:  # read without importing torch: config errors come first
        return argv
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging="))]
    return kept + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


# What python -m run --help says of each config group, and the keys of every run it lists with one line each (the
# editors' frequently used keys come from their settings, algs.settings_help).
GROUP_HELP = {
    "alg": "the editor",
    "experiment": "the task and its data",
    "model": "the base model and the weights it edits",
    "schedule": "a CPU demo schedule (+model=smollm2 and +model=minilm bring theirs)",
}
KEY_HELP = {
    "data.n_edits": "edits applied at once per batch; the rest of the batch is locality examples",
    "batch_size": "edits + locality examples per training batch",
    "val_batch_size": "the same for validation",
    "max_iters": "training steps at most",
    "max_time": "training budget in seconds (null: none)",
    "accumulate_bs": "training steps per optimiser step",
    "log_interval": "steps between log lines",
    "val_interval": "steps between validations (and best checkpoints)",
    "val_steps": "validation edits",
    "early_stop_patience": "steps without a better validation before training stops",
    "cedit": "weight of the edit loss",
    "cloc": "weight of the locality KL",
    "seed": "random seed",
    "device": "auto | cpu | cuda | cuda:N (auto: cuda when available)",
    "eval_only": "evaluate the editor of archive= without training",
    "archive": "a trained run directory or checkpoint to evaluate or start from",
    "resume": "a run directory to continue after an interruption",
    "results_dir": "where results.json goes (null: the run directory)",
    "data.path": "directory of the original data files (null: the embedded set)",
    "model.name": "hub id or local directory of the base model",
    "model.inner_params": "the edited weights, e.g. [transformer.h.5.mlp.c_fc.weight]",
    "model.dtype": "float32 | bfloat16 | float16: the base model's weights",
    "wandb.enabled": "log to wandb (offline unless wandb.mode=online)",
    "silent": "no progress bars",
}
EXAMPLES = (
    "python -m run +alg=mend +experiment=gen +model=smollm2   # the embedded model: runs offline",
    "python -m run +alg=mend +experiment=gen +model=distilgpt2 data.n_edits=5 batch_size=6 val_batch_size=6",
    "python -m run +alg=mend +experiment=gen +model=smollm2 eval_only=True archive=outputs/<run>",
)


def _option_help(path: str) -> str:
    """A config file's description: the first clause of its first comment (up to '. ', '; ' or ', ' outside
    parentheses), and of that, what comes before a ': ' when it is longer than a line of the help holds."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line[1:].strip() if line.startswith("#") else ""
            if text.startswith("@package"):
                continue
            if not text:
                break
            lines.append(text)
    text = _clause(" ".join(lines), ".;,")
    return _clause(text, ":") if len(text) > 100 else text


def _clause(text: str, ends: str) -> str:
    """``text`` up to the first of the characters ``ends`` followed by a space (or ending it), outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char in ends and text[i + 1 : i + 2] in (" ", ""):
            return text[:i]
    return text


def usage() -> str:
    """The text of ``python -m run --help``: the config groups and their files, the frequently used keys with their
    defaults (the schema's: a file of a group may change them), and example command lines."""
    defaults = OmegaConf.structured(Config)
    defaults.model = ModelConfig()  # its keys without a default (name, ...) are a model file's

    def default(key: str) -> str:
        parent, _, name = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(defaults, parent) if parent else defaults, name):
            return "<per model>"
        value = OmegaConf.select(defaults, key)
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    out = [
        "Train an editor on a base model and evaluate it, or evaluate a trained one (docs/configuration.md).",
        "",
        "usage: python -m run +alg=<editor> +experiment=<experiment> +model=<model> [key=value ...]",
        "",
        "Config groups, each chosen with a '+' (+alg=mend, not alg=mend):",
    ]
    for group in GROUPS:
        out.append(f"  +{group + '=<name>':<20}{GROUP_HELP.get(group, '')}".rstrip())
        for name in group_options(group):
            out.append(f"    {name:<14}{_option_help(os.path.join(CONFIG_DIR, group, name + '.yaml'))}")
    rows = [(f"{key}={default(key)}", text) for key, text in {**KEY_HELP, **settings_help()}.items()]
    width = max(len(key) for key, _ in rows) + 2
    out += ["", "Frequently used keys (key=default; the files of a group may change the default):"]
    out += [f"  {key:<{width}}{text}" for key, text in rows]
    out += ["", "Examples:"] + [f"  {line}" for line in EXAMPLES]
    out += [
        "",
        "Every key is typed and checked before anything loads: an unknown key is refused, with or without a '+'.",
        "The whole configuration of a command line: add --cfg job. Hydra's own flags: --hydra-help.",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    sys.argv = _quiet_hydra_on_other_ranks(sys.argv)
    try:
        check_command_line(sys.argv[1:])  # a key or value Hydra refuses: one line and exit 2, not Hydra's report
    except UserError as e:
        _fail(e)
    main()
