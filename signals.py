"""Stopping a long job gracefully: the first SIGINT / SIGTERM asks it to stop at the next safe point, a second one
stops it at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable


@contextlib.contextmanager
def graceful_stop(on_first: Callable[[int], None], asked: Callable[[], bool]):
    """Within the block, SIGINT and SIGTERM call ``on_first(signum)`` when ``asked()`` is False (no stop requested
    yet) and raise KeyboardInterrupt otherwise. The previous handlers come back on exit. Outside the main thread
    (where Python delivers no signals) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if asked():
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        on_first(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
