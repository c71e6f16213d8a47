"""Data for the ``counterfact`` experiment: counterfactual fact edits in ROME's CounterFact format.

A record (Meng et al., 2022, "Locating and Editing Factual Associations in GPT", the ``counterfact.json`` of ROME
and MEMIT)::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                           "target_new": {"str": "English"}, "target_true": {"str": "French"}, ...},
     "paraphrase_prompts": [...], "neighborhood_prompts": [...],
     "attribute_prompts": [...], "generation_prompts": [...]}

``prompt`` holds ``{}`` where the subject goes. Paraphrase prompts state the same fact otherwise (CounterFact puts
them behind an unrelated sentence); neighborhood prompts are about other subjects whose true answer is
``target_true`` and must stay so; attribute prompts are about subjects whose true answer is ``target_new``;
generation prompts start free text about the subject. An optional ``reference_texts`` list (this project's
extension) holds texts about ``target_new`` for the consistency score; ROME draws them from Wikipedia.

Sources, by ``data.path``:

* a JSON file holding a list of records (``counterfact.json``) or a JSON-lines file of records: the records are
  split by subject into train and validation (``data.val_fraction``, seeded), so no subject is on both sides;
* ``hf:<dataset id>`` (e.g. ``hf:azhx/counterfact``): the ``train`` split of that dataset on the HuggingFace hub,
  through the ``datasets`` package, split the same way;
* null: the embedded set, built from the bundled country facts (:mod:`data_classes.facts`): for each fact whose
  object is shared by other countries (region, subregion, main language, currency), a rewrite to another object of
  the same relation; paraphrases from the relation's other templates behind an unrelated true sentence;
  neighborhood prompts from other countries of the same split with the same true object; attribute prompts from
  countries whose object is the new one; train and validation split by country;
* null with ``data.facts=large``: the large embedded set of some 15,000 cases about places
  (:mod:`data_classes.large_facts`), split by subject.

Training batches (:class:`CounterFactDataset`, causal LMs): the edit is the rewrite prompt with ``target_new``; the
equivalence input a paraphrase with ``target_new`` (or, with probability ``data.rewrite_equivalence``, the rewrite
prompt itself, so that the edit loss also sees the template the neighbours share); the locality inputs are, with
``data.neighborhood_locality`` (default), the edit's own neighborhood prompts with their true answer, so that the
editor learns to keep exactly the facts its edits are most likely to disturb; otherwise other records' rewrite
prompts with their true answers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import DataError
from .base import hub_id_hint, hub_rows, normalise_split, read_jsonl
from .base import rng as _rng
from .embedded import EmbeddedSet, json_list_text
from .facts import FACT_PACKAGES, RELATIONS, Fact, load_facts, split_countries
from .large_facts import ensure_counterfact, wants_large
from .qa import QADataset

LOG = logging.getLogger(__name__)

CACHE_FORMAT = 1
FORMAT_HINT = (
    'each record: {"case_id": int, "requested_rewrite": {"prompt": "... {} ...", "subject": str, '
    '"target_new": {"str": str}, "target_true": {"str": str}}, "paraphrase_prompts": [str], '
    '"neighborhood_prompts": [str], "attribute_prompts": [str], "generation_prompts": [str]}'
)
LIST_KEYS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")
N_NEIGHBORS = 5  # embedded set: neighborhood and attribute prompts per record
GENERATION_TEMPLATES = ("{s} is", "The country of {s}", "People who visit {s} find that")

_SALT_NEW, _SALT_PREFIX, _SALT_NEIGHBOR, _SALT_SPLIT, _SALT_PARA, _SALT_LOC, _SALT_TRAIN, _SALT_EVAL = range(8)
_SALT_EQUIV = 8


# --------------------------------------------------------------------------------------------
# Reading and checking records


def check_record(record, where: str) -> dict:
    """A CounterFact record checked field by field (a DataError names ``where`` and the field); lists default to
    empty, ``case_id`` must be an integer."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {FORMAT_HINT}.")
    case_id = record.get("case_id")
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise DataError(f"{where}: 'case_id' must be an integer, got {case_id!r}.")
    where = f"{where} (case_id {case_id})"
    rewrite = record.get("requested_rewrite")
    if isinstance(rewrite, list) and len(rewrite) == 1:  # MEMIT's multi-rewrite files hold a list of one
        rewrite = rewrite[0]
    if not isinstance(rewrite, dict):
        raise DataError(f"{where}: 'requested_rewrite' must be an object; {FORMAT_HINT}.")
    for key in ("prompt", "subject"):
        if not isinstance(rewrite.get(key), str) or not rewrite[key].strip():
            raise DataError(f"{where}: 'requested_rewrite.{key}' must be a non-empty string.")
    if "{}" not in rewrite["prompt"]:
        raise DataError(f"{where}: 'requested_rewrite.prompt' must hold {{}} where the subject goes.")
    targets = {}
    for key in ("target_new", "target_true"):
        value = rewrite.get(key)
        text = value.get("str") if isinstance(value, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'requested_rewrite.{key}.str' must be a non-empty string.")
        targets[key] = text.strip()
    out = {
        "case_id": case_id,
        "prompt": rewrite["prompt"],
        "subject": rewrite["subject"],
        "target_new": targets["target_new"],
        "target_true": targets["target_true"],
        "relation_id": str(rewrite.get("relation_id", "")),
    }
    for key in (*LIST_KEYS, "reference_texts"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}: {key!r} must be a list of strings.")
        out[key] = [v for v in value if v.strip()]
    return out


def read_counterfact(path) -> List[dict]:
    """The records of a CounterFact file: a JSON list (``counterfact.json``) or JSON lines, each checked."""
    path = Path(os.path.expanduser(str(path)))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path}: no such file (data.path); it must hold CounterFact records, {FORMAT_HINT}.{hub_id_hint(path)}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}).") from None
        records = [check_record(r, f"{path}, record {i}") for i, r in enumerate(items)]
    else:
        records = [check_record(r, where) for _, where, r in read_jsonl(path, DataError, FORMAT_HINT)]
    if not records:
        raise DataError(f"{path}: holds no records; {FORMAT_HINT}.")
    seen = set()
    for r in records:
        if r["case_id"] in seen:
            raise DataError(f"{path}: case_id {r['case_id']} appears twice; case ids must be unique.")
        seen.add(r["case_id"])
    return records


def read_hub(dataset_id: str) -> List[dict]:
    """The records of a CounterFact-format dataset on the HuggingFace hub (its ``train`` split)."""
    hint = "download ROME's counterfact.json elsewhere and set data.path=<file>, or leave data.path unset (embedded)"
    rows = hub_rows(dataset_id, ("train",), hint)
    return [check_record(dict(r), f"hf:{dataset_id}, row {i}") for i, r in enumerate(rows)]


def split_by_subject(records: Sequence[dict], val_fraction: float, seed: int) -> Dict[str, List[dict]]:
    """Train and validation records, a seeded split by subject (no subject on both sides)."""
    subjects = sorted({r["subject"] for r in records})
    order = _rng(seed, _SALT_SPLIT).permutation(len(subjects))
    n_val = max(1, int(round(val_fraction * len(subjects)))) if len(subjects) > 1 else 0
    val = {subjects[i] for i in order[:n_val]}
    return {
        "train": [r for r in records if r["subject"] not in val],
        "validation": [r for r in records if r["subject"] in val],
    }


# --------------------------------------------------------------------------------------------
# The embedded set


def _prompt_of(template: str) -> Optional[str]:
    """A claim template ending in its object ("{s} is a country in {o}.") as a prompt ("{s} is a country in")."""
    return template[: -len(" {o}.")] if template.endswith(" {o}.") else None


def _prompts(relation: str) -> List[str]:
    return [p for p in (_prompt_of(t) for t in RELATIONS[relation][0]) if p is not None]


def embedded_params(data_cfg, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "packages": FACT_PACKAGES,
        "seed": int(seed),
        "val_fraction": float(data_cfg.val_fraction),
        "max_countries": data_cfg.max_countries,
    }


def build_embedded(params: dict) -> Dict[str, List[dict]]:
    """The embedded CounterFact-format set of each split (see the module docstring)."""
    facts = load_facts()
    countries = sorted({f.country for f in facts})
    if params["max_countries"]:
        keep = set(countries[: int(params["max_countries"])])
        facts = [f for f in facts if f.country in keep]
    train, val = split_countries(facts, params["val_fraction"], params["seed"])
    out: Dict[str, List[dict]] = {}
    case_id = 0
    for split, members in (("train", set(train)), ("validation", set(val))):
        mine = [f for f in facts if f.country in members]
        by_object: Dict[Tuple[str, str], List[Fact]] = {}
        for f in mine:
            by_object.setdefault((f.relation, f.obj), []).append(f)
        claims = [f for f in facts if f.country not in members]  # unrelated prefixes: other countries' facts
        records = []
        for f in mine:
            prompts = _prompts(f.relation)
            neighbors = [g for g in by_object[(f.relation, f.obj)] if g.country != f.country]
            if not prompts or not neighbors:
                continue  # a unique object (a capital, a demonym): no neighbourhood that shares the true answer
            rng = _rng(params["seed"], _SALT_NEW, case_id)
            others = sorted({o for (rel, o), group in by_object.items() if rel == f.relation and o != f.obj})
            if not others:
                continue
            new = others[int(rng.integers(len(others)))]
            attribute = list(by_object[(f.relation, new)])
            pick = _rng(params["seed"], _SALT_NEIGHBOR, case_id)
            neighbors = [neighbors[j] for j in sorted(pick.permutation(len(neighbors))[:N_NEIGHBORS])]
            attribute = [attribute[j] for j in sorted(pick.permutation(len(attribute))[:N_NEIGHBORS])]
            prefix_rng = _rng(params["seed"], _SALT_PREFIX, case_id)
            paraphrases = []
            for k, template in enumerate(prompts[1:] or prompts[:1] * 2):
                prefix = claims[int(prefix_rng.integers(len(claims)))].claim(k)
                paraphrases.append(f"{prefix} {template.format(s=f.country)}")
            references = [g.claim(k) for g in attribute for k in range(len(RELATIONS[f.relation][0]))]
            records.append(
                {
                    "case_id": case_id,
                    "requested_rewrite": {
                        "prompt": prompts[0].replace("{s}", "{}"),
                        "subject": f.country,
                        "target_new": {"str": new},
                        "target_true": {"str": f.obj},
                        "relation_id": f.relation,
                    },
                    "paraphrase_prompts": paraphrases,
                    "neighborhood_prompts": [prompts[0].format(s=g.country) for g in neighbors],
                    "attribute_prompts": [prompts[0].format(s=g.country) for g in attribute],
                    "generation_prompts": [t.format(s=f.country) for t in GENERATION_TEMPLATES],
                    "reference_texts": references,
                }
            )
            case_id += 1
        out[split] = records
    return out


def ensure_embedded(cache_dir: str, data_cfg, seed: int) -> EmbeddedSet:
    """The embedded set in the data cache (``train.json``, ``validation.json``), built once."""
    params = embedded_params(data_cfg, seed)
    embedded = EmbeddedSet("counterfact", params, cache_dir, suffix=".json", dump=json_list_text, noun="cases")
    return embedded.ensure(lambda _: build_embedded(params))


def load_split(data_cfg, split: str, seed: int, cache_dir: str) -> Tuple[List[dict], str]:
    """(records of ``split``, where they came from) for the configured source."""
    split = normalise_split(split)
    path = data_cfg.path
    if not path:
        if wants_large(data_cfg):
            embedded = ensure_counterfact(cache_dir, data_cfg, seed)
        else:
            embedded = ensure_embedded(cache_dir, data_cfg, seed)
        return embedded.read(split, read_counterfact), str(embedded.file(split))
    path = str(path)
    records = read_hub(path[3:]) if path.startswith("hf:") else read_counterfact(path)
    return split_by_subject(records, float(data_cfg.val_fraction), seed)[split], path


# --------------------------------------------------------------------------------------------
# Training batches


class CounterFactDataset(QADataset):
    """CounterFact cases of one split as training batches (see the module docstring); causal LMs only."""

    model_kinds = ("causal_lm",)  # the model.kind values it serves (data_classes.check_model_kind)

    TRAIN_ORDER_SALT = _SALT_TRAIN
    EVAL_ORDER_SALT = _SALT_EVAL
    LOC_NAME = "locality prompt"

    def __init__(self, tokenizer, data_cfg, split, seed, cache_dir, model=None, model_id="", device="cpu"):
        self._setup(tokenizer, data_cfg, split, seed, model)
        if self.seq2seq:
            raise DataError("The counterfact experiment edits causal LMs (prompt continuations); use qa for seq2seq.")
        cases, self.source = load_split(data_cfg, self.split, self.seed, cache_dir)
        cases = [c for c in cases if c["paraphrase_prompts"] or not data_cfg.rephrase]
        if len(cases) < 2:
            raise DataError(f"{self.source}: the {self.split} split has {len(cases)} usable cases; it needs 2.")
        self.cases = cases
        self.records = []
        for i, c in enumerate(cases):
            prompt = c["prompt"].format(c["subject"])
            paraphrases = c["paraphrase_prompts"] or [prompt]
            rephrase = paraphrases[int(_rng(self.seed, _SALT_PARA, i).integers(len(paraphrases)))]
            self.records.append(
                {
                    "input": prompt,
                    "alt": c["target_new"],
                    "answer": c["target_true"],
                    "rephrase": rephrase,
                    "cond": f"{c['target_true']} >> {c['target_new']} || {prompt}",
                    "country": c["subject"],
                    "neighbors": c["neighborhood_prompts"],
                }
            )
        self.nq = None
        LOG.info("counterfact %s split: %d cases from %s", self.split, len(self), self.source)

    def __getitem__(self, i: int) -> dict:
        c = self.cases[i]
        return {**c, "prompt": c["prompt"].format(c["subject"])}

    def _rephrase(self, i: int, draw: int = 0) -> str:
        """The equivalence input of edit i in batch ``draw``: its paraphrase, or with probability
        ``data.rewrite_equivalence`` (a seeded draw per batch) the rewrite prompt itself."""
        p = float(self.cfg.rewrite_equivalence)
        if p > 0 and _rng(self.seed, _SALT_EQUIV, i, draw).random() < p:
            return self.records[i]["input"]
        return self.records[i]["rephrase"]

    def _loc(self, i: int, k: int, draw: int = 0) -> Tuple[str, str]:
        """The k-th locality example of edit i: one of its neighborhood prompts with the true answer
        (``data.neighborhood_locality``), else another case's rewrite prompt with its true answer."""
        r = self.records[i]
        rng = _rng(self.seed, _SALT_LOC, i, k, draw)
        if self.cfg.neighborhood_locality and r["neighbors"]:
            return r["neighbors"][int(rng.integers(len(r["neighbors"])))], r["answer"]
        return super()._loc(i, k, draw)
