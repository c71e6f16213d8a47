"""The cache of the embedded edit sets: each is built once (from the bundled packages; gen's with the model) and
read back by later runs.

An embedded set is cached under ``<cache_dir>/data/<task>/<key>/``, where ``key`` is a hash of the parameters it is
built with (``params``: everything its rows depend on, among them a format number that a change of the build bumps),
as one file a split (``train<suffix>``, ``validation<suffix>``) and ``params.json`` (the parameters, for a reader;
gen keeps them inside its split files instead). The set counts as built when the file of every split exists.

:class:`EmbeddedSet` does the rest for every set (gen, qa, fc, counterfact): :meth:`~EmbeddedSet.ensure` calls the
set's build function only when the cache lacks a split, writes what it returns, and logs one line;
:meth:`~EmbeddedSet.read` reads a split back with the set's own reader.

* Writing: every file goes through :func:`utils.atomic_write_text` (a temporary file, then a rename), ``params.json``
  first and the split files last. When the build function or a write raises, the files that this build wrote are
  removed again, so a failed build leaves nothing that a later run could take for a built set.
* A damaged cache is refused, not rebuilt: when the set's reader rejects a cached file (cut short, or changed by
  hand: the writes themselves are atomic), :meth:`~EmbeddedSet.read` raises one :class:`DataError` line that names
  the file, gives the reader's reason and says which directory to delete to rebuild the set. A silent rebuild would
  hide what damaged the file (a full disk, a failing one) and, for gen, sample from the model again for minutes.
* Progress: the build function gets a ``progress(done, total)`` callable to call as it goes; by default it logs a
  line at every tenth of the way, and a caller may pass its own (a progress bar).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, TypeVar

from utils import atomic_write_text

from . import DataError

LOG = logging.getLogger(__name__)

SPLITS = ("train", "validation")

Rows = TypeVar("Rows")
Progress = Callable[[int, int], None]


def data_cache_dir(cache_dir: str, task: str, params: dict) -> Path:
    """Where an embedded set built with ``params`` is cached: ``<cache_dir>/data/<task>/<hash of params>``."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(str(cache_dir))) / "data" / task / key


def jsonl_text(rows: List[dict]) -> str:
    """Rows as JSON lines (the zsRE and FEVER formats)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def json_list_text(rows: List[dict]) -> str:
    """Rows as one JSON list (the CounterFact format)."""
    return json.dumps(rows, indent=1, ensure_ascii=False) + "\n"


def params_text(params: dict) -> str:
    """The text of ``params.json``."""
    return json.dumps(params, indent=2) + "\n"


def log_progress(task: str) -> Progress:
    """A ``progress(done, total)`` that logs a line each time another tenth of the build is done."""
    start, reported = time.time(), [0]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > reported[0] and done < total:
            reported[0] = tenth
            LOG.info("Building the embedded %s set: %d of %d (%.0f s)", task, done, total, time.time() - start)

    return progress


class EmbeddedSet:
    """One embedded set in the data cache (see the module docstring).

    ``task`` names the cache's folder; ``params`` key it; ``suffix`` ends the split files' names; ``dump`` gives
    the text of one split's file from what the build returns for it; ``params_file`` the text of ``params.json``
    (None: none is written); ``count`` the number of examples of a split, and ``noun`` what they are called, for
    the log line.
    """

    def __init__(
        self,
        task: str,
        params: dict,
        cache_dir: str,
        suffix: str = ".jsonl",
        dump: Callable[[Rows], str] = jsonl_text,
        params_file: Optional[Callable[[dict], str]] = params_text,
        count: Callable[[Rows], int] = len,
        noun: str = "examples",
    ):
        self.task, self.params, self.suffix = task, params, suffix
        self.dump, self.params_file, self.count, self.noun = dump, params_file, count, noun
        self.dir = data_cache_dir(cache_dir, task, params)

    def file(self, split: str) -> Path:
        """The cached file of ``split`` (``train`` or ``validation``)."""
        return self.dir / f"{split}{self.suffix}"

    def built(self) -> bool:
        return all(self.file(s).is_file() for s in SPLITS)

    def ensure(self, build: Callable[[Progress], Dict[str, Rows]], progress: Optional[Progress] = None) -> EmbeddedSet:
        """Build the set unless it is cached: ``build(progress)`` returns the rows of each split. Returns self."""
        if self.built():
            LOG.info("Loading the embedded %s set from %s", self.task, self.dir)
            return self
        start = time.time()
        splits = build(progress or log_progress(self.task))
        if sorted(splits) != sorted(SPLITS):
            raise ValueError(f"The build of the embedded {self.task} set returned {sorted(splits)}, not {SPLITS}.")
        self._write(splits)
        LOG.info(
            "Built the embedded %s set (%s %s) in %s (%.1f s)",
            self.task,
            ", ".join(f"{self.count(splits[s])} {s}" for s in SPLITS),
            self.noun,
            self.dir,
            time.time() - start,
        )
        return self

    def _write(self, splits: Dict[str, Rows]) -> None:
        texts = [(self.file(s), self.dump(splits[s])) for s in SPLITS]
        if self.params_file is not None:
            texts.insert(0, (self.dir / "params.json", self.params_file(self.params)))
        written: List[Path] = []
        try:
            for path, text in texts:
                atomic_write_text(text, str(path))
                written.append(path)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def read(self, split: str, reader: Callable[[Path], Rows]) -> Rows:
        """``reader(file of split)``; a file the reader refuses is one DataError that says how to rebuild it."""
        try:
            return reader(self.file(split))
        except DataError as e:
            raise DataError(
                f"{e} The embedded {self.task} set cached in {self.dir} is damaged: delete that directory to "
                f"rebuild it."
            ) from None
