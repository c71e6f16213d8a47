"""What the edit sets of every experiment share: seeded streams and the batch schedule.

A data set subclasses :class:`EditDataset` and implements ``__len__`` and ``_batch(edits, n_loc, epoch, draw)``,
which builds one batch (the ``edit_inner`` / ``edit_outer`` / ``loc`` / ``cond`` / ``raw`` layout described in
``data_classes/gen.py``) from the indices of its edits. :meth:`EditDataset.edit_generator` decides which edits
go together, in which order, and how many locality examples each batch gets. ``draw`` numbers the batch within
its stream (training: counted over epochs; a fixed order: its index): the data sets seed the random parts of a batch
(its locality partners, gen's equivalence cut) with it, so that each batch draws them anew, as the original's
sampler does, while the same stream always gives the same batches (and a resumed run the batches it would have had).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hub import hub_unreachable_reason, offline_mode

from . import DataError

LOG = logging.getLogger(__name__)


def read_jsonl(path, error=DataError, hint: str = "") -> List[Tuple[int, str, object]]:
    """(line number, "<path>, line <n>", parsed object) for each non-blank line of a JSON-lines file. A file that
    cannot be read or a line that is not JSON raises ``error`` naming the file (and line), with ``hint`` (what a line
    must hold) after the reason."""
    tail = f"; {hint}" if hint else ""
    try:
        with open(os.path.expanduser(str(path)), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise error(f"{path}: no such file.") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}).") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            out.append((number, where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno}){tail}.") from None
    return out


def hub_rows(dataset_id: str, splits: Sequence[str], offline_hint: str) -> List[dict]:
    """The rows, as dicts, of the first of ``splits`` that a dataset on the HuggingFace hub has
    (``datasets.load_dataset``; with HF_HUB_OFFLINE=1, from the local datasets cache). Without the ``datasets``
    package, without the hub or without such a split: one DataError that says what to do (``offline_hint``: the
    offline way), at once rather than after huggingface_hub's retries."""
    try:
        import datasets  # imported on use: only a hub source needs it, and it takes a second to import
    except ImportError:
        raise DataError(
            f"data.path=hf:{dataset_id} needs the `datasets` package: pip install datasets (or {offline_hint})."
        ) from None
    reason = None if offline_mode() else hub_unreachable_reason()
    if reason is not None:
        raise DataError(
            f"data.path=hf:{dataset_id}: the HuggingFace hub could not be reached ({reason}). Offline, "
            f"{offline_hint} (a dataset already in the local datasets cache loads with HF_HUB_OFFLINE=1)."
        )
    try:
        found = datasets.load_dataset(dataset_id)
    except Exception as e:  # the hub, the network or the dataset: one message either way
        raise DataError(
            f"data.path=hf:{dataset_id}: the dataset could not be loaded ({type(e).__name__}: {str(e)[:200]}). "
            f"Offline, {offline_hint}."
        ) from None
    for name in splits:
        if name in found:
            return [dict(r) for r in found[name]]
    raise DataError(
        f"data.path=hf:{dataset_id} has the splits {sorted(found)}, none of {list(splits)}; {offline_hint}."
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_hint(path) -> str:
    """For a data path that does not exist and reads as a hub dataset id (``owner/name``): a sentence saying how to
    load it from the hub; else ''."""
    text = str(path)
    if os.path.exists(os.path.expanduser(text)) or not _HUB_ID.fullmatch(text) or text.endswith((".json", ".jsonl")):
        return ""
    return f" For the dataset {text} on the HuggingFace hub, write hf:{text}."


def rng(*entropy: int) -> np.random.Generator:
    """A generator seeded by the integers given (the seed, a salt that names the use, indices)."""
    return np.random.default_rng([int(e) for e in entropy])


def normalise_split(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("validation", "val", "valid", "dev"):
        return "validation"
    raise DataError(f"split={split!r}: expected 'train' or 'validation'.")


class EditDataset(torch.utils.data.Dataset):
    """The batch schedule shared by the experiments. Subclasses set ``split``, ``seed`` and ``cfg`` (the data
    config: every key of ``config_schema.DataConfig``), the two order salts, and what one locality example is
    called in messages."""

    TRAIN_ORDER_SALT: int
    EVAL_ORDER_SALT: int
    LOC_NAME = "locality example"

    @classmethod
    def preflight(cls, cfg, overrides=()) -> None:
        """Checks of the run configuration ``cfg`` that need no model or data loaded, made before anything loads
        (raise a :class:`errors.UserError` saying what to do). ``overrides``: the command line's Hydra overrides,
        for messages that give a command. Default: none."""

    split: str
    seed: int

    def _batch(self, edits: List[int], n_loc: int, epoch: int = 0, draw: int = 0) -> dict:
        raise NotImplementedError

    def edit_generator(self, batch_size: int, n: Optional[int] = None, start: int = 0) -> Iterator[dict]:
        """Batches of ``data.n_edits`` edits plus ``batch_size - n_edits`` locality examples.

        Train split with ``n=None``: endless, a new seeded permutation of the examples each epoch;
        ``start`` skips that many batches without building them (to resume a run where it stopped).
        Validation split, or any split with ``n`` given: exactly ``n`` batches (``n=None``:
        ``len(self) // n_edits``) from the start of a fixed seeded order, the same on every call;
        the order wraps around when ``n * n_edits`` exceeds the number of examples.
        """
        n_edits = int(self.cfg.n_edits)
        n_loc = int(batch_size) - n_edits
        if n_edits < 1:
            raise DataError(f"data.n_edits={n_edits} must be >= 1.")
        if n_loc < 1:
            raise DataError(
                f"data.n_edits={n_edits} must be smaller than batch_size={batch_size}: each batch holds n_edits "
                f"edits plus at least one {self.LOC_NAME} (e.g. data.n_edits=5 batch_size=6)."
            )
        size = len(self)
        if size < n_edits:
            raise DataError(f"The {self.split} split has {size} examples, fewer than data.n_edits={n_edits}.")
        if self.split == "train" and n is None:
            return self._train_batches(n_edits, n_loc, start)
        if n is None:
            n = size // n_edits
        return self._fixed_batches(n_edits, n_loc, int(n))

    def _train_batches(self, n_edits: int, n_loc: int, start: int = 0) -> Iterator[dict]:
        per_epoch = len(self) // n_edits
        epoch, first = divmod(int(start), per_epoch)
        while True:
            order = rng(self.seed, self.TRAIN_ORDER_SALT, epoch).permutation(len(self)).tolist()
            for b in range(first, per_epoch):
                yield self._batch(order[b * n_edits : (b + 1) * n_edits], n_loc, epoch, draw=epoch * per_epoch + b)
            epoch, first = epoch + 1, 0

    def _fixed_batches(self, n_edits: int, n_loc: int, n: int) -> Iterator[dict]:
        order = rng(self.seed, self.EVAL_ORDER_SALT).permutation(len(self)).tolist()
        if n * n_edits > len(order):
            LOG.info(
                "%d %s batches of %d edits need %d examples; the split has %d, so the order wraps around.",
                n,
                self.split,
                n_edits,
                n * n_edits,
                len(order),
            )
        for b in range(n):
            yield self._batch([order[(b * n_edits + j) % len(order)] for j in range(n_edits)], n_loc, draw=b)
