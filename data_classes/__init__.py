"""Edit data sets, one module per experiment, by the name ``+experiment=<name>`` (``task``) selects. Each yields
batches with the roles edit_inner / edit_outer / loc / cond (see data_classes/gen.py for the layout) and
subclasses :class:`data_classes.base.EditDataset`. Each class says which kinds of model it serves (``model_kinds``,
of ``model.kind``): :func:`check_model_kind` refuses another where the run starts.

The registry holds import paths, not classes, so that a configuration can be checked against it before torch
loads; :func:`dataset_class` imports one.
"""

from __future__ import annotations

import importlib

from errors import (
    ConfigError,
    DataError,  # noqa: F401  (re-exported: the data modules raise it as ``from . import DataError``)
)

DATASETS = {
    "gen": "data_classes.gen.GenDataset",
    "fc": "data_classes.fc.FCDataset",
    "qa": "data_classes.qa.QADataset",
    "counterfact": "data_classes.counterfact.CounterFactDataset",
}


def dataset_class(task: str):
    """The data set class of experiment ``task``."""
    module, name = DATASETS[task].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def check_model_kind(cfg) -> None:
    """Refuse, in one line naming the model, its kind and the experiments it can run, a run whose experiment's data
    set does not serve the model's kind (``model_kinds`` of its class). Imports the data set classes (torch): called
    where the data set's preflight runs, after the configuration is validated."""
    served = {task: dataset_class(task).model_kinds for task in DATASETS}
    if cfg.model.kind in served[cfg.task]:
        return
    runs = [task for task, kinds in served.items() if cfg.model.kind in kinds]
    raise ConfigError(
        f"model {cfg.model.name!r} (kind {cfg.model.kind}) cannot run experiment {cfg.task!r}; "
        f"it runs: {', '.join(runs)}."
    )
