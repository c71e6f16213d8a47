"""Progress bars for long loops (building data sets, evaluating many edits): tqdm bars on the terminal, fed by
``progress(done, total)`` callbacks so that the loops themselves do not depend on tqdm."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

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
    :meth:`close`. Bars are shown on a terminal only (tqdm's ``disable=None``); ``disable=True`` shows none
    (``--quiet``)."""

    def __init__(self, disable: Optional[bool] = None):
        self.bars: Dict[str, tqdm] = {}
        self.disable = disable

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is not None and (done < bar.n or bar.total != total):
            bar.close()
            bar = None
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total, desc=stage, dynamic_ncols=True, disable=self.disable, leave=False
            )
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
