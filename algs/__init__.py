"""The editors, by the name ``+alg=<name>`` selects: every folder ``algs/<name>/`` whose ``__init__.py`` names an
editor. Each implements :class:`editable_model.EditableModel`.

An editor is one folder and one YAML file, and nothing else names it (the registry below is found, not listed):

- ``algs/<name>/__init__.py``: its settings, torch-free (read while the configuration is composed and validated,
  before torch loads): ``EDITOR``, the name of its class in ``editor.py``; ``SETTINGS``, a dataclass of the keys of
  its group ``<name>.*`` with their types and defaults; ``RANGES``, the range (``ranges.Range``) of each numeric
  key, by its name in the group; optionally ``check(cfg)``, the checks that span several keys (raise
  ``errors.ConfigError`` naming them), and ``RENAMED_KEYS``, the keys it spelled otherwise before (old -> new);
- ``algs/<name>/editor.py``: the editor class, imported only by :func:`editor_class`;
- ``config/alg/<name>.yaml``: ``alg: <name>`` and the settings it changes from the defaults.

Every registered editor's group is part of the schema (``config_schema.Config``), whichever editor runs, and its
ranges and checks run in ``config_schema.validate_config``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Callable, Dict


def _discover() -> Dict[str, ModuleType]:
    """The settings module of every subpackage of algs that names an editor, by the subpackage's name."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.ispkg:
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "EDITOR"):
                found[info.name] = module
    return found


#: name -> the editor's settings module (``algs.<name>``)
EDITORS: Dict[str, ModuleType] = _discover()
#: name -> import path of the editor class; a configuration is checked against it before torch loads
ALGS: Dict[str, str] = {name: f"{__name__}.{name}.editor.{m.EDITOR}" for name, m in EDITORS.items()}


def editor_class(name: str):
    """The editor class registered as ``name`` (a KeyError for an unknown one: check names with ``ALGS`` first)."""
    module, cls = ALGS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def settings_groups() -> Dict[str, type]:
    """name -> the dataclass of the editor's settings group."""
    return {name: m.SETTINGS for name, m in EDITORS.items()}


def settings_ranges() -> dict:
    """The range of every numeric key of every editor's group, by its full name (``<name>.<key>``)."""
    return {f"{name}.{key}": rule for name, m in EDITORS.items() for key, rule in m.RANGES.items()}


def renamed_keys() -> Dict[str, str]:
    """The editors' keys that earlier versions spelled otherwise, old name -> new name."""
    return {old: new for m in EDITORS.values() for old, new in getattr(m, "RENAMED_KEYS", {}).items()}


def settings_checks() -> Dict[str, Callable]:
    """name -> the editor's check of the keys of its group that span several keys (editors that have one)."""
    return {name: m.check for name, m in EDITORS.items() if hasattr(m, "check")}
