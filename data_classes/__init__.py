"""Edit data sets, one module per experiment, by the name ``+experiment=<name>`` (``task``) selects. Each yields
batches with the roles edit_inner / edit_outer / loc / cond (see data_classes/gen.py for the layout) and
subclasses :class:`data_classes.base.EditDataset`.

The registry holds import paths, not classes, so that a configuration can be checked against it before torch
loads; :func:`dataset_class` imports one.
"""

from __future__ import annotations

import importlib

from errors import DataError  # noqa: F401  (re-exported: the data modules raise it as ``from . import DataError``)

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
