"""Helpers shared by the loaders of :mod:`models`: one-line error text and quiet transformers progress bars."""

from __future__ import annotations

import contextlib

from transformers.utils import logging as hf_logging


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' per-load progress bars (restored afterwards)."""
    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
