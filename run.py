"""Train or evaluate an editor.

python -m run +alg=mend +experiment=gen +model=smollm2
python -m run +alg=mend +experiment=gen +model=distilgpt2 data.n_edits=5 batch_size=6 val_batch_size=6
python -m run +alg=mend +experiment=gen +model=smollm2 eval_only=True archive=outputs/<run>
python -m run +alg=mend +experiment=gen +model=smollm2 resume=outputs/<run>   # continue an interrupted run
python -m run +alg=efk|enn +experiment=gen +model=smollm2     # the learned baselines, trained the same way
python -m run +alg=ft +experiment=gen +model=smollm2          # fine-tuning: nothing to train, evaluated directly
python -m run +alg=ft +experiment=gen +model=smollm2 ft.locality.enabled=True   # FT+KL

Exit status: 0 done; 2 a clear error (bad config, data, model or checkpoint; a loss that stays non-finite; a
checkpoint that cannot be written), logged as one line; 128 + the signal number after SIGINT / SIGTERM, once
the resume point checkpoints/last.pt is written.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from config_schema import ConfigError, register_configs, validate_config

LOG = logging.getLogger("run")

ALGS = {
    "mend": "algs.mend.MEND",
    "efk": "algs.efk.EFK",
    "enn": "algs.enn.ENN",
    "ft": "algs.ft.FT",
}
DATASETS = {"gen": "data_classes.gen.GenDataset"}


def _load(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build(cfg: DictConfig):
    """The frozen base model, its tokenizer, the train and validation edit sets, and an editor factory."""
    from models import check_inner_params, get_model, get_tokenizer
    from utils import resolve_device, seed_everything

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    cache_dir = os.path.expanduser(cfg.cache_dir)

    # 1. the frozen base model, its tokenizer, and the weights to edit
    model = get_model(cfg.model, cache_dir)
    check_inner_params(model, list(cfg.model.inner_params))
    tokenizer = get_tokenizer(cfg.model, cache_dir)
    model.to(device)

    # 2. the edit data (built from the model itself on first use for the embedded gen set)
    dataset_class = _load(DATASETS[cfg.task])
    datasets = [
        dataset_class(
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
    editor_class = _load(ALGS[cfg.alg])
    seed_everything(cfg.seed)

    def make_editor():
        editor = editor_class(model, cfg)
        editor.attach_training_data(datasets[0])  # FT+KL draws locality batches from it at edit time
        return editor.to(device)

    return model, tokenizer, datasets, make_editor


def main_job(cfg: DictConfig, run_dir: str) -> dict:
    # Imported here so that config errors are reported before torch and transformers load.
    from trainer import LAST_NAME, EditTrainer, load_checkpoint, resume_run_dir

    # 0. a checkpoint to resume or to start from must exist, be readable and fit this setting: refuse it early
    if cfg.resume is not None:
        load_checkpoint(cfg.resume, cfg, name=LAST_NAME, key="resume")
        run_dir = resume_run_dir(cfg.resume)
    elif cfg.archive is not None:
        load_checkpoint(cfg.archive, cfg)

    _, _, datasets, make_editor = build(cfg)
    trainer = EditTrainer(make_editor, cfg, datasets[0], datasets[1], run_dir)
    return trainer.run()


register_configs()


@hydra.main(config_path="config", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        validate_config(cfg, algs=ALGS, tasks=DATASETS)
    except ConfigError as e:
        _fail(e)
    from data_classes import DataError
    from models import InnerParamsError, ModelLoadError
    from trainer import CheckpointError, NonFiniteLossError, TrainingInterrupted

    user_errors = (
        ConfigError,
        ModelLoadError,
        InnerParamsError,
        CheckpointError,
        DataError,
        NonFiniteLossError,
        FileNotFoundError,
    )
    try:
        main_job(cfg, HydraConfig.get().runtime.output_dir)
    except user_errors as e:
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


if __name__ == "__main__":
    main()
