"""The editors, by the name ``+alg=<name>`` selects: every folder ``algs/<name>/`` whose ``__init__.py`` names an
editor. Each implements :class:`editable_model.EditableModel`.

An editor is one folder and one YAML file, and nothing else names it (the registry below is found, not listed):

- ``algs/<name>/__init__.py``: its settings, torch-free (read while the configuration is composed and validated,
  before torch loads): ``EDITOR``, the name of its class in ``editor.py``; ``SETTINGS``, a dataclass of the keys of
  its group ``<name>.*`` with their types and defaults; ``RANGES``, the range (``ranges.Range``) of each numeric
  key, by its name in the group; optionally ``check(cfg)``, the checks that span several keys (raise
  ``errors.ConfigError`` naming them), and ``RENAMED_KEYS``, the keys it spelled otherwise before (old -> new);
  also optional: ``check_shapes(cfg, shapes)``, the checks of its settings against the shapes of the weights it edits
  once the model is loaded (a rank above a layer's width), ``HELP``, a one-line description of its frequently
  used keys for ``python -m run --help``, and ``resolve(cfg, given)``, the keys of a composed configuration it sets
  from others unless the command line gave them (``given``: the dotted keys it set; ROME, MEMIT and AlphaEdit take
  ``model.inner_params`` from the model file's ``locate`` block);
- ``algs/<name>/editor.py``: the editor class, imported only by :func:`editor_class`;
- ``config/alg/<name>.yaml``: ``alg: <name>`` and the settings it changes from the defaults.

Every registered editor's group is part of the schema (``config_schema.Config``), whichever editor runs, and its
ranges and checks run in ``config_schema.validate_config``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Callable, Dict, List, Sequence


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


def resolve_settings(cfg, given: Sequence[str]) -> None:
    """The running editor's (``cfg.alg``) ``resolve``, where it has one: the keys it derives from others (the edited
    weights from the model file's ``locate`` block), left as they are where ``given`` (the command line's keys)
    names them. Raises a ConfigError naming the keys it cannot fill."""
    resolve = getattr(EDITORS.get(cfg.alg), "resolve", None)
    if resolve is not None:
        resolve(cfg, set(given))


def check_shapes(cfg, shapes: Dict[str, Sequence[int]]) -> List[str]:
    """The running editor's (``cfg.alg``) check of its settings against the shapes of the weights it edits (name ->
    shape), once the model is loaded: raises a ConfigError naming the key, or returns warnings, one line each."""
    check = getattr(EDITORS[cfg.alg], "check_shapes", None)
    return list(check(cfg, {name: tuple(shape) for name, shape in shapes.items()})) if check else []


def settings_help() -> Dict[str, str]:
    """The one-line description of each editor's frequently used keys (its ``HELP``), by full name (``mend.lr``)."""
    return {f"{name}.{key}": text for name, m in EDITORS.items() for key, text in getattr(m, "HELP", {}).items()}
