"""Data for the ``fc`` experiment: flip (or keep) a binary fact-checker's verdict on a claim.

An edit example is a claim x_e and a binary label y_e (1: SUPPORTS, 0: REFUTES). As in the original, the
label is drawn at random with p=0.5: the classifier's recorded prediction, or its alternative (the other
label); the condition text that EFK reads is ``"<prediction> >> <new label> || <claim>"``. The equivalence
input is a rephrasing of the claim with the same label; the locality inputs are other claims, labelled with
their true (gold) label, so that their accuracy before and after the edit can be compared (drawdown).

Sources:

* ``data.path``: a directory with the original FEVER files (KILT format, De Cao et al.), one JSON object a
  line: ``fever-train-kilt.jsonl`` and ``fever-dev-kilt.jsonl`` (or ``train.jsonl`` and ``validation.jsonl``
  / ``dev.jsonl`` / ``val.jsonl``). Each line is
  ``{"input": claim, "prediction": "SUPPORTS"|"REFUTES", "alternatives": [...], "filtered_rephrases": [...],
  "output": [{"answer": "SUPPORTS"|"REFUTES"}], "logit": float}``. Lines without alternatives or rephrases are
  skipped (as the original does); a line that is not valid JSON or lacks a key is a :class:`DataError` naming
  the file and the line number.
* otherwise the embedded claim set, built from :mod:`data_classes.facts`: each fact gives a true claim
  (SUPPORTS) and a false one, its object swapped for another of the same relation (REFUTES), each with the
  other claim templates as rephrasings. Train and validation are split by country. It is written once in the
  same format under ``<cache_dir>/data/fc/<key>/{train,validation}.jsonl``. The ``prediction`` field holds the
  true label there (the set is built without a model); ``logit`` is null.

Batches have the layout of :mod:`data_classes.gen`: ``edit_inner``, ``edit_outer``, ``loc`` and ``cond``, each
a dict of ``input_ids``, ``attention_mask`` and ``labels`` (shape (rows, 1), 0/1), and ``raw`` (the texts).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from errors import ModelLoadError

from . import DataError
from .base import EditDataset, normalise_split, read_jsonl
from .base import rng as _rng
from .embedded import EmbeddedSet
from .facts import FACT_PACKAGES, RELATIONS, load_facts, objects_by_relation, other_object, split_countries

LOG = logging.getLogger(__name__)

POSITIVE, NEGATIVE = "SUPPORTS", "REFUTES"
LABELS = (POSITIVE, NEGATIVE)
TRAIN_FILES = ("fever-train-kilt.jsonl", "train.jsonl")
VALIDATION_FILES = ("fever-dev-kilt.jsonl", "validation.jsonl", "dev.jsonl", "val.jsonl")
FORMAT_HINT = (
    '{"input": claim, "prediction": "SUPPORTS"|"REFUTES", "alternatives": [...], "filtered_rephrases": [...], '
    '"output": [{"answer": "SUPPORTS"|"REFUTES"}], "logit": float}'
)
# Bump when the embedded build changes in a way that invalidates cached files.
CACHE_FORMAT = 1

_SALT_FALSE, _SALT_FLIP, _SALT_REPHRASE, _SALT_LOC, _SALT_TRAIN_ORDER, _SALT_EVAL_ORDER = range(100, 106)
_SPLIT_IDS = {"train": 0, "validation": 1}


def fine_tune_command(overrides) -> str:
    """The command that fine-tunes the classifier a run with these Hydra overrides expects (its ``model.pt``)."""
    keep = [
        o
        for o in overrides
        if o.split("=")[0].lstrip("+") in ("model", "seed", "cache_dir") or o.startswith(("model.", "+model.", "data."))
    ]
    keep = [o for o in keep if not o.startswith(("data.n_edits", "data.rephrase"))]
    return "python -m scripts.train_fc_classifier" + (" -- " + " ".join(keep) if keep else "")


# --------------------------------------------------------------------------------------------
# The FEVER (KILT) format


def split_file(directory: Path, split: str) -> Path:
    """The file of ``split`` in a data directory; raises DataError saying what is expected."""
    names = TRAIN_FILES if split == "train" else VALIDATION_FILES
    if not directory.is_dir():
        raise DataError(
            f"data.path={str(directory)!r} is not a directory. For fc it must hold {TRAIN_FILES[0]} and "
            f"{VALIDATION_FILES[0]} (or train.jsonl and validation.jsonl), one JSON object a line: {FORMAT_HINT}."
        )
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"{directory / names[0]} not found: data.path={str(directory)!r} must hold {' or '.join(names)} for the "
        f"{split} split (FEVER, KILT format, one JSON object a line: {FORMAT_HINT})."
    )


def _check_record(d, where: str) -> dict:
    """One line of a FEVER file, checked; returns the fields the data set uses."""
    if not isinstance(d, dict):
        raise DataError(f"{where}: expected a JSON object {FORMAT_HINT}, got {type(d).__name__}.")
    for key in ("input", "prediction", "alternatives", "filtered_rephrases", "output"):
        if key not in d:
            raise DataError(f"{where}: missing key {key!r}; each line must be {FORMAT_HINT}.")
    if not isinstance(d["input"], str) or not d["input"].strip():
        raise DataError(f"{where}: 'input' must be a non-empty string (the claim).")
    if d["prediction"] not in LABELS:
        raise DataError(f"{where}: 'prediction' is {d['prediction']!r}; expected {POSITIVE!r} or {NEGATIVE!r}.")
    for key in ("alternatives", "filtered_rephrases"):
        if not isinstance(d[key], list) or not all(isinstance(x, str) for x in d[key]):
            raise DataError(f"{where}: {key!r} must be a list of strings.")
    bad_alt = [a for a in d["alternatives"] if a not in LABELS]
    if bad_alt:
        raise DataError(f"{where}: 'alternatives' holds {bad_alt[0]!r}; expected {POSITIVE!r} or {NEGATIVE!r}.")
    out = d["output"]
    if not isinstance(out, list) or not out or not isinstance(out[0], dict) or out[0].get("answer") not in LABELS:
        raise DataError(
            f"{where}: 'output' must be a non-empty list whose first entry is {{\"answer\": {POSITIVE!r} or "
            f"{NEGATIVE!r}}} (the true label)."
        )
    logit = d.get("logit")
    if logit is not None and not isinstance(logit, (int, float)):
        raise DataError(f"{where}: 'logit' must be a number or null, got {type(logit).__name__}.")
    return d


def read_fever(path: Path) -> Tuple[List[dict], int]:
    """Read one FEVER (KILT) JSONL file. Returns (usable records, number skipped).

    A record keeps ``input``, ``prediction``, ``alternatives``, ``rephrases`` (the filtered rephrases without the
    claim itself), ``label`` (the true label) and ``group`` (``country`` when the line has one, else its line
    number: locality claims come from another group). Lines without alternatives or rephrases are skipped.
    """
    records, skipped = [], 0
    for lineno, where, d in read_jsonl(path, DataError, f"each line must be {FORMAT_HINT}"):
        d = _check_record(d, where)
        rephrases = [r for r in d["filtered_rephrases"] if r.strip() and r != d["input"]]
        if not d["alternatives"] or not rephrases:
            skipped += 1
            continue
        records.append(
            {
                "input": d["input"],
                "prediction": d["prediction"],
                "alternatives": list(d["alternatives"]),
                "rephrases": rephrases,
                "label": d["output"][0]["answer"],
                "group": str(d.get("country") or f"line {lineno}"),
            }
        )
    if not records:
        raise DataError(
            f"{path}: no usable example ({skipped} lines without alternatives or rephrases were skipped); "
            f"expected lines {FORMAT_HINT}."
        )
    return records, skipped


# --------------------------------------------------------------------------------------------
# The embedded claim set


def embedded_params(data_cfg, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "facts": FACT_PACKAGES,
        "seed": int(seed),
        "val_fraction": float(data_cfg.val_fraction),
        "max_countries": data_cfg.max_countries,
    }


def ensure_embedded(cache_dir: str, data_cfg, seed: int) -> EmbeddedSet:
    """The embedded claim set in the data cache (``train.jsonl``, ``validation.jsonl``), built once."""
    params = embedded_params(data_cfg, seed)
    embedded = EmbeddedSet("fc", params, cache_dir, params_file=_params_json, noun="claims")
    return embedded.ensure(lambda _: build_embedded(params))


def _params_json(params: dict) -> str:
    """fc's ``params.json``: indented by one, its keys sorted, as the existing caches hold it."""
    return json.dumps(params, indent=1, sort_keys=True) + "\n"


def build_claims(facts, val_fraction: float, seed: int) -> Dict[str, List[dict]]:
    """FEVER-format records from facts: a true and a false claim per fact, split by country (seeded)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1.")
    pools = objects_by_relation(facts)
    train_countries, val_countries = split_countries(facts, val_fraction, seed)
    side = {c: "train" for c in train_countries}
    side.update({c: "validation" for c in val_countries})
    out: Dict[str, List[dict]] = {"train": [], "validation": []}
    for index, fact in enumerate(facts):
        n = len(RELATIONS[fact.relation][0])
        false_obj = other_object(fact, pools, _rng(seed, _SALT_FALSE, index))
        for obj, label in ((None, POSITIVE), (false_obj, NEGATIVE)):
            other = NEGATIVE if label == POSITIVE else POSITIVE
            out[side[fact.country]].append(
                {
                    "id": f"{fact.country}|{fact.relation}|{'true' if label == POSITIVE else 'false'}",
                    "input": fact.claim(0, obj),
                    "prediction": label,
                    "alternatives": [other],
                    "filtered_rephrases": [fact.claim(k, obj) for k in range(1, n)],
                    "output": [{"answer": label}],
                    "logit": None,
                    "country": fact.country,
                    "relation": fact.relation,
                }
            )
    return out


def build_embedded(params: dict) -> Dict[str, List[dict]]:
    """Both splits of the embedded claim set: the claims of the facts of the first ``max_countries`` countries."""
    facts = load_facts()
    limit = params.get("max_countries")
    if limit:
        keep = sorted({f.country for f in facts})[: int(limit)]
        facts = [f for f in facts if f.country in keep]
    return build_claims(facts, params["val_fraction"], params["seed"])


# --------------------------------------------------------------------------------------------
# The data set


class FCDataset(EditDataset):
    """Claims of one split and the edit batches the trainer consumes (see :meth:`edit_generator`)."""

    model_kinds = ("classifier",)  # the model.kind values it serves (data_classes.check_model_kind)

    TRAIN_ORDER_SALT = _SALT_TRAIN_ORDER
    EVAL_ORDER_SALT = _SALT_EVAL_ORDER
    LOC_NAME = "locality claim"

    @classmethod
    def preflight(cls, cfg, overrides=()) -> None:
        """fc edits a fine-tuned classifier (``model.pt``): if it is not there, say which command makes it."""
        if not cfg.model.pt or os.path.isfile(os.path.expanduser(str(cfg.model.pt))):
            return
        raise ModelLoadError(
            f"model.pt={cfg.model.pt}: no fine-tuned fact-checker there. The fc experiment edits a trained "
            f"classifier; fine-tune it first: {fine_tune_command(overrides)} (or set model.pt=null to edit the "
            f"pre-trained encoder with an untrained head)."
        )

    def __init__(
        self,
        tokenizer,
        data_cfg,
        split: str,
        seed: int,
        cache_dir: str = "~/.cache/mend-repro",
        model=None,
        model_id: str = "",
        device="cpu",
        max_length: Optional[int] = None,
    ):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.split = normalise_split(split)
        self.split_id = _SPLIT_IDS[self.split]
        self.seed = int(seed)
        if max_length is None:
            max_length = int(data_cfg.max_length)
            context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if isinstance(context, int) and context > 0:
                max_length = min(max_length, context)
        self.max_length = max_length

        path = data_cfg.path
        if path:
            self.source = split_file(Path(os.path.expanduser(str(path))), self.split)
            self.records, self.n_skipped = read_fever(self.source)
        else:
            embedded = ensure_embedded(cache_dir, data_cfg, self.seed)
            self.source = embedded.file(self.split)
            self.records, self.n_skipped = embedded.read(self.split, read_fever)
        if self.n_skipped:
            LOG.info("%s: %d lines without alternatives or rephrases skipped.", self.source, self.n_skipped)
        if len({r["group"] for r in self.records}) < 2:
            raise DataError(f"{self.source}: at least two claims are needed (locality claims come from another).")

        self.claims = [r["input"] for r in self.records]
        self.gold = [int(r["label"] == POSITIVE) for r in self.records]
        self.edit_labels, self.conds = [], []
        for i, r in enumerate(self.records):
            flip = bool(_rng(self.seed, _SALT_FLIP, self.split_id, i).random() < 0.5)
            new = r["alternatives"][0] if flip else r["prediction"]
            self.edit_labels.append(int(new == POSITIVE))
            self.conds.append(f"{r['prediction']} >> {new} || {r['input']}")
        self.groups = [r["group"] for r in self.records]
        LOG.info("fc %s split: %d claims from %s", self.split, len(self), self.source)

    # ---- access

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return {
            "claim": r["input"],
            "rephrases": list(r["rephrases"]),
            "label": self.edit_labels[i],
            "true_label": self.gold[i],
            "cond": self.conds[i],
        }

    def rephrase(self, i: int, epoch: int = -1) -> str:
        """The rephrasing used for example i: a fixed seeded pick (epoch -1), or a new one per training epoch."""
        options = self.records[i]["rephrases"]
        return options[int(_rng(self.seed, _SALT_REPHRASE, self.split_id, i, epoch + 1).integers(len(options)))]

    def loc_partner(self, i: int, r: int, avoid: Sequence[int] = (), draw: int = 0) -> int:
        """The r-th locality claim of edit i in batch ``draw``: another claim of the split, from another group
        (country) than edit i and the edits ``avoid`` (the rest of its batch) when there is one, drawn from
        (seed, i, r, draw), so every batch draws anew."""
        groups = self.groups
        banned = {groups[i]} | {groups[k] for k in avoid}
        rng = _rng(self.seed, _SALT_LOC, self.split_id, i, r, draw)
        for _ in range(64):
            j = int(rng.integers(len(self)))
            if groups[j] not in banned:
                return j
        others = [k for k in range(len(self)) if groups[k] not in banned]
        if not others:  # fewer groups than edits in the batch: only the edit's own group is excluded
            others = [k for k in range(len(self)) if groups[k] != groups[i]]
        return others[int(rng.integers(len(others)))]

    # ---- batches

    def _encode(self, texts: Sequence[str], labels: Sequence[int]) -> Dict[str, torch.Tensor]:
        enc = self.tok(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(list(labels), dtype=torch.long).view(-1, 1),
        }

    def _batch(self, edits: List[int], n_loc: int, epoch: int = -1, draw: int = 0) -> dict:
        labels = [self.edit_labels[i] for i in edits]
        inner = self._encode([self.claims[i] for i in edits], labels)
        if self.cfg.rephrase:
            rephrases = [self.rephrase(i, epoch) for i in edits]
            outer = self._encode(rephrases, labels)
        else:
            rephrases = [self.claims[i] for i in edits]
            outer = {k: v.clone() for k, v in inner.items()}
        # Slot k holds partner k // n_edits of edit k % n_edits (as in gen).
        locs = [self.loc_partner(edits[k % len(edits)], k // len(edits), edits, draw) for k in range(n_loc)]
        loc = self._encode([self.claims[j] for j in locs], [self.gold[j] for j in locs])
        cond = self._encode([self.conds[i] for i in edits], labels)
        return {
            "edit_inner": inner,
            "edit_outer": outer,
            "loc": loc,
            "cond": cond,
            "raw": {
                "claim": [self.claims[i] for i in edits],
                "rephrase": rephrases,
                "label": labels,
                "true_label": [self.gold[i] for i in edits],
                "cond": [self.conds[i] for i in edits],
                "loc": [self.claims[j] for j in locs],
                "loc_label": [self.gold[j] for j in locs],
            },
        }
