"""Progress bars for long loops (building data sets, evaluating many edits): tqdm bars on the terminal, fed by
``progress(done, total)`` callbacks so that the loops themselves do not depend on tqdm."""

from __future__ import annotations

import sys
import time
from typing import Callable, Dict, List, Optional, TextIO

from tqdm import tqdm

Progress = Callable[[int, int], None]


def progress_bar(desc: str, unit: str = "case") -> Progress:
    """A ``progress(done, total)`` that shows a tqdm bar, opened at the first call and closed at the last."""
    bar: List[tqdm] = []

    def progress(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True))
        bar[0].update(done - bar[0].n)
        if done >= total:
            bar[0].close()

    return progress


class ProgressBars:
    """A ``progress(stage, done, total)`` with one bar per stage ("unedited model", "edits", ...): a stage's bar
    starts over when its ``done`` goes back (the next run of a plan) and each is closed at its total or on
    :meth:`close`. On a terminal they are tqdm bars. Where standard error is not a terminal (a log file, a batch
    job) and ``disable`` is None, each stage writes a plain line instead: at its first call, then at most every
    ``interval`` seconds, and at its end (``edits: 300/1000 (30%), 41 s, 7.3/s, about 1.6 min left``).
    ``disable=True`` shows nothing (``--quiet``)."""

    def __init__(self, disable: Optional[bool] = None, interval: float = 30.0, stream: Optional[TextIO] = None):
        self.bars: Dict[str, tqdm] = {}
        self.disable = disable
        self.interval = interval
        self.stream = stream
        self.lines: Dict[str, list] = {}  # stage -> [total, start time, time of the last line, done]

    def _as_lines(self) -> bool:
        if self.disable is not None:
            return False
        stream = self.stream or sys.stderr
        return not (hasattr(stream, "isatty") and stream.isatty())

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._as_lines():
            self._line(stage, done, total)
            return
        bar = self.bars.get(stage)
        if bar is not None and (done < bar.n or bar.total != total):
            bar.close()
            bar = None
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total, desc=stage, dynamic_ncols=True, disable=self.disable, leave=False
            )
        bar.update(done - bar.n)

    def _line(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        state = self.lines.get(stage)
        if state is None or done < state[3] or state[0] != total:
            state = self.lines[stage] = [total, now, float("-inf"), done]  # its first call writes a line
        state[3] = done
        finished = done >= total
        if not finished and now - state[2] < self.interval:
            return
        state[2] = now
        elapsed = now - state[1]
        text = f"{stage}: {done}/{total}" + (f" ({100 * done / total:.0f}%)" if total else "") + f", {elapsed:.0f} s"
        if elapsed > 0 and done:
            rate = done / elapsed
            text += f", {rate:.1f}/s" if rate >= 1 else f", {1 / rate:.1f} s each"
            if not finished:
                left = (total - done) / rate
                text += f", about {left / 60:.1f} min left" if left >= 60 else f", about {left:.0f} s left"
        print(text, file=self.stream or sys.stderr, flush=True)
        if finished:
            del self.lines[stage]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.lines.clear()
