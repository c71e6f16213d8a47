"""Train or evaluate an editor.

python -m run +alg=<editor> +experiment=<experiment> +model=<model>   # an editor of algs/, trained and evaluated
python -m run +alg=<editor> +experiment=gen +model=distilgpt2 data.n_edits=5 batch_size=6 val_batch_size=6
python -m run +alg=<editor> +experiment=gen +model=smollm2 eval_only=True archive=outputs/<run>
python -m run +alg=<editor> +experiment=gen +model=smollm2 resume=outputs/<run>   # continue an interrupted run
torchrun --nproc_per_node=4 -m run +alg=<editor> +experiment=gen +model=smollm2    # 4 processes (GPUs), DDP

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

from algs import ALGS, editor_class
from config_schema import check_command_line, check_known_keys, register_configs, validate_config
from data_classes import DATASETS, check_model_kind, dataset_class
from errors import TrainingInterrupted, UserError

LOG = logging.getLogger("run")


def build(cfg: DictConfig):
    """The frozen base model, its tokenizer, the train and validation edit sets, and an editor factory."""
    # Imported here, as in main_job: a configuration error is reported before torch and transformers load.
    import distributed
    from models import check_inner_params, get_model, get_tokenizer
    from utils import resolve_device, seed_everything

    device = distributed.local_device(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    cache_dir = os.path.expanduser(cfg.cache_dir)

    # 1. the frozen base model (one replica per process), its tokenizer, and the weights to edit
    with distributed.local_main_first():  # under torchrun, one process per machine fills the model cache
        model = get_model(cfg.model, cache_dir)
    check_inner_params(model, list(cfg.model.inner_params))
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
    from utils import resolve_device

    # Under torchrun: join the other processes; every rank works in rank 0's run directory.
    dist_env = distributed.init(cfg, distributed.local_device(resolve_device(cfg.device)))
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


if __name__ == "__main__":
    sys.argv = _quiet_hydra_on_other_ranks(sys.argv)
    try:
        check_command_line(sys.argv[1:])  # a key or value Hydra refuses: one line and exit 2, not Hydra's report
    except UserError as e:
        _fail(e)
    main()
