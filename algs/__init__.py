"""The editors, by the name ``+alg=<name>`` selects. Each implements :class:`editable_model.EditableModel`.

The registry holds import paths, not classes, so that a configuration can be checked against it before torch
loads; :func:`editor_class` imports one.
"""

from __future__ import annotations

import importlib

ALGS = {
    "mend": "algs.mend.editor.MEND",
    "efk": "algs.efk.editor.EFK",
    "enn": "algs.enn.editor.ENN",
    "ft": "algs.ft.editor.FT",
}


def editor_class(name: str):
    """The editor class registered as ``name`` (a KeyError for an unknown one: check names with ``ALGS`` first)."""
    module, cls = ALGS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)
