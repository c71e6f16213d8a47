"""The large embedded fact set (``data.facts=large``): some 15,000 counterfactual edits of facts about places, in
the CounterFact format for ``+experiment=counterfact`` and in the ``zsre_mend`` format for ``+experiment=qa``.

The facts come from :mod:`data_classes.geo_facts` (six relations: city -> country, US city -> state, US county ->
state, subdivision -> country, country -> continent, country -> official language). Subjects are split into train
and validation (``data.val_fraction`` of them held out, seeded), so no subject is on both sides. Within a split, a
fact becomes a case when at least one other subject of the split shares its object (its neighbourhood); the case
asks to rewrite the object to another object of the same relation, drawn uniformly from those the split holds.

A CounterFact case: the rewrite prompt (the relation's first template, ``{}`` for the subject), three paraphrases
(the relation's other templates, each behind an unrelated true sentence, as CounterFact's are), up to five
neighbourhood prompts (other subjects of the split with the same true object), up to five attribute prompts
(subjects whose true object is the new one), the relation's generation prompts, and reference texts for the
consistency score (true sentences about the attribute subjects, which state the new object). A ``zsre_mend``
record of the same fact: the first question template (``src``), a seeded other one (``rephrase``), the new object
(``alt``), the true one (``answers``, ``pred``) and a locality question about another subject of the split with
its answer (``loc``, ``loc_ans``). Both formats hold the same facts with the same new objects in the same order,
a seeded shuffle of each split (so the first N cases mix the relations).

Each set is built once and cached by :class:`data_classes.embedded.EmbeddedSet` (``<cache_dir>/data/counterfact/<key>``
and ``<cache_dir>/data/qa/<key>``, keyed by these parameters), with a progress bar while it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from progress import progress_bar

from .base import rng as _rng
from .embedded import SPLITS, EmbeddedSet, Progress, json_list_text
from .geo_facts import GEO_PACKAGES, RELATIONS, GeoFact, load_geo_facts

CACHE_FORMAT = 1
N_NEIGHBORS = 5  # neighbourhood and attribute prompts per case
N_REFERENCE_TEMPLATES = 2  # reference texts: this many true sentences about each attribute subject

_SALT_SPLIT, _SALT_ORDER, _SALT_NEW, _SALT_PREFIX, _SALT_LOC = range(5)
_SALT_BASE = 0x1A46E  # keeps these draws apart from the small set's


def wants_large(data_cfg) -> bool:
    """Whether the configuration selects the large set (``data.facts=large``; validate_config checks the value)."""
    return str(getattr(data_cfg, "facts", "small")) == "large"


def large_params(data_cfg, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "facts": "large",
        "packages": GEO_PACKAGES,
        "seed": int(seed),
        "val_fraction": float(data_cfg.val_fraction),
    }


def rng(seed: int, salt: int, *index: int):
    return _rng(seed, _SALT_BASE, salt, *index)


@dataclass
class Case:
    fact: GeoFact
    new: str
    neighbors: List[GeoFact]
    attribute: List[GeoFact]


def split_subjects(facts: List[GeoFact], val_fraction: float, seed: int) -> Tuple[set, set]:
    """(train subjects, validation subjects): a seeded split of the distinct subjects."""
    subjects = sorted({f.subject for f in facts})
    order = rng(seed, _SALT_SPLIT).permutation(len(subjects))
    n_val = max(1, int(round(val_fraction * len(subjects))))
    val = {subjects[i] for i in order[:n_val]}
    return set(subjects) - val, val


def plan(params: dict, facts: Optional[List[GeoFact]] = None) -> Dict[str, List[Case]]:
    """The cases of each split (see the module docstring), in their final order."""
    seed = params["seed"]
    facts = load_geo_facts() if facts is None else facts
    train, val = split_subjects(facts, params["val_fraction"], seed)
    out: Dict[str, List[Case]] = {}
    for s, (split, members) in enumerate((("train", train), ("validation", val))):
        mine = [f for f in facts if f.subject in members]
        by_object: Dict[Tuple[str, str], List[GeoFact]] = {}
        for f in mine:
            by_object.setdefault((f.relation, f.obj), []).append(f)
        objects: Dict[str, List[str]] = {}
        for relation, obj in sorted(by_object):
            objects.setdefault(relation, []).append(obj)
        usable = [f for f in mine if len(by_object[(f.relation, f.obj)]) > 1 and len(objects[f.relation]) > 1]
        order = rng(seed, _SALT_ORDER, s).permutation(len(usable))
        draw = rng(seed, _SALT_NEW, s)  # one generator a split, drawn from in case order
        cases = []
        for j in order:
            f = usable[j]
            others = [o for o in objects[f.relation] if o != f.obj]
            new = others[int(draw.integers(len(others)))]
            neighbors = [g for g in by_object[(f.relation, f.obj)] if g.subject != f.subject]
            attribute = by_object[(f.relation, new)]
            cases.append(Case(f, new, _pick(neighbors, draw), _pick(attribute, draw)))
        out[split] = cases
    return out


def _pick(items: List[GeoFact], draw: np.random.Generator) -> List[GeoFact]:
    """Up to N_NEIGHBORS of ``items``, a seeded draw kept in their order."""
    if len(items) <= N_NEIGHBORS:
        return list(items)
    return [items[k] for k in sorted(draw.choice(len(items), N_NEIGHBORS, replace=False))]


def _counterfact_record(case: Case, case_id: int, facts: List[GeoFact], split_facts, draw) -> dict:
    """The CounterFact record of a case; the true sentence before each paraphrase is another relation's."""
    f = case.fact
    n_prompts = len(RELATIONS[f.relation].prompts)
    paraphrases = []
    for k in range(1, n_prompts):
        other = facts[int(draw.integers(len(facts)))]
        while other.subject == f.subject or other.relation == f.relation:
            other = facts[int(draw.integers(len(facts)))]
        paraphrases.append(f"{other.claim(k % n_prompts)} {f.prompt(k)}")
    references = [
        g.claim((j + t) % n_prompts) for j, g in enumerate(case.attribute) for t in range(N_REFERENCE_TEMPLATES)
    ]
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": f.rewrite_template(),
            "subject": f.subject,
            "target_new": {"str": case.new},
            "target_true": {"str": f.obj},
            "relation_id": f.relation,
        },
        "paraphrase_prompts": paraphrases,
        "neighborhood_prompts": [g.prompt(0) for g in case.neighbors],
        "attribute_prompts": [g.prompt(0) for g in case.attribute],
        "generation_prompts": [f.fill(t) for t in RELATIONS[f.relation].generation],
        "reference_texts": references,
    }


def _zsre_mend_record(case: Case, case_id: int, facts, split_facts: List[GeoFact], draw) -> dict:
    """The zsre_mend record of a case; its locality question is about another subject of its split's cases."""
    f = case.fact
    n_questions = len(RELATIONS[f.relation].questions)
    rephrase = f.question(1 + int(draw.integers(n_questions - 1)))
    other = split_facts[int(draw.integers(len(split_facts)))]
    while other.subject == f.subject:
        other = split_facts[int(draw.integers(len(split_facts)))]
    question = f.question(0)
    return {
        "case_id": case_id,
        "subject": f.subject,
        "relation": f.relation,
        "src": question,
        "pred": f.obj,  # no model answer: the true object stands in for it (as in the small set)
        "rephrase": rephrase,
        "alt": case.new,
        "answers": [f.obj],
        "loc": other.question(0),
        "loc_ans": other.obj,
        "cond": f"{f.obj} >> {case.new} || {question}",
    }


RecordFn = Callable[[Case, int, List[GeoFact], List[GeoFact], np.random.Generator], dict]


def build(params: dict, record: RecordFn, salt: int, progress: Progress, facts: Optional[List[GeoFact]] = None):
    """The records of each split, ``record(case, case_id, all facts, the facts of the split's cases, generator)`` for
    each case of :func:`plan` (case ids run on from train into validation; one seeded generator a split, ``salt``
    naming the format); ``progress(done, total)`` as it goes."""
    facts = load_geo_facts() if facts is None else facts
    cases = plan(params, facts)
    total, done = sum(len(c) for c in cases.values()), 0
    out: Dict[str, List[dict]] = {}
    for s, split in enumerate(SPLITS):
        split_facts = [c.fact for c in cases[split]]
        draw = rng(params["seed"], salt, s)
        rows = []
        for case in cases[split]:
            rows.append(record(case, done, facts, split_facts, draw))
            done += 1
            if done % 500 == 0 or done == total:
                progress(done, total)
        out[split] = rows
    return out


def build_counterfact(params: dict, progress: Progress = lambda d, n: None, facts=None) -> Dict[str, List[dict]]:
    return build(params, _counterfact_record, _SALT_PREFIX, progress, facts)


def build_zsre_mend(params: dict, progress: Progress = lambda d, n: None, facts=None) -> Dict[str, List[dict]]:
    return build(params, _zsre_mend_record, _SALT_LOC, progress, facts)


def ensure_counterfact(cache_dir: str, data_cfg, seed: int, progress: Optional[Progress] = None, facts=None):
    """The large set in the CounterFact format in the data cache (``train.json``, ``validation.json``), built once
    (from ``facts`` where given: :func:`load_geo_facts`'s, already read). Returns its :class:`EmbeddedSet`."""
    params = large_params(data_cfg, seed)
    embedded = EmbeddedSet("counterfact", params, cache_dir, suffix=".json", dump=json_list_text, noun="cases")
    bar = progress or progress_bar("Building the large CounterFact set")
    return embedded.ensure(lambda p: build_counterfact(params, p, facts), progress=bar)


def ensure_zsre_mend(cache_dir: str, data_cfg, seed: int, progress: Optional[Progress] = None, facts=None):
    """The large set in the zsre_mend format in the data cache (``train.json``, ``validation.json``), built once
    (from ``facts`` where given). Returns its :class:`EmbeddedSet`."""
    params = large_params(data_cfg, seed)
    embedded = EmbeddedSet("qa", params, cache_dir, suffix=".json", dump=json_list_text, noun="questions")
    bar = progress or progress_bar("Building the large zsre_mend set")
    return embedded.ensure(lambda p: build_zsre_mend(params, p, facts), progress=bar)
