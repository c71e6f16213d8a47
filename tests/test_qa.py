"""The qa (zsRE) experiment: the loader, the embedded question set, batches for BART, T5 and causal LMs, the editors
on encoder-decoder models, and the command line, all on tiny models built from config classes (no download)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
import transformers
from conftest import freeze, make_config
from omegaconf import OmegaConf

from algs import ALGS
from config_schema import ConfigError, DataConfig, compose_config, validate_config
from data_classes import DATASETS, DataError, check_model_kind
from data_classes.qa import QADataset, build_embedded, embedded_params, ensure_embedded, read_zsre
from losses import masked_log_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, BART's own order (bos 0, pad 1, eos 2)
WORDS = (
    "what is the capital of which city country language spoken in currency who wrote where was born river "
    "paris lima rome oslo cairo tokyo berlin madrid quito lagos france peru italy norway egypt japan spain "
    "english french spanish arabic euro yen sol krone pound a an name called people from"
).split()
BART_INNER = [f"model.{side}.layers.1.{fc}.weight" for side in ("encoder", "decoder") for fc in ("fc1", "fc2")]
T5_INNER = [
    f"{side}.block.1.layer.{k}.DenseReluDense.{w}.weight"
    for side, k in (("encoder", 1), ("decoder", 2))
    for w in ("wi_0", "wi_1", "wo")
]


def word_tokenizer(template: str = "bart"):
    """A word-level tokenizer over WORDS, with BART's special tokens; BART adds <s> ... </s>, T5 ... </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(WORDS + ["?", ".", ">>", "||"])))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A </s>" if template == "bart" else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_bart(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(
        vocab_size=vocab,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return freeze(transformers.BartForConditionalGeneration(cfg))


def tiny_t5(vocab: int, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        vocab_size=vocab,
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return freeze(transformers.T5ForConditionalGeneration(cfg))


def tiny_causal(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=64)
    return freeze(transformers.GPT2LMHeadModel(cfg))


CAPITALS = [("france", "paris"), ("peru", "lima"), ("italy", "rome"), ("norway", "oslo"), ("egypt", "cairo")]
CAPITALS += [("japan", "tokyo"), ("spain", "madrid")]


def zsre_records(n: int = 7):
    out = []
    for i in range(n):
        country, city = CAPITALS[i % len(CAPITALS)]
        others = [c for _, c in CAPITALS if c != city]
        out.append(
            {
                "input": f"what is the capital of {country} ?",
                "prediction": city,
                "alternatives": others[i % 3 : i % 3 + 2],
                "filtered_rephrases": [
                    f"what is the capital of {country} ?",
                    f"which city is the capital of {country} ?",
                ],
                "output": [{"answer": city}, {"answer": "the " + city}],
            }
        )
    return out


def write_zsre(directory, train=None, val=None, names=("train.jsonl", "validation.jsonl")):
    directory.mkdir(parents=True, exist_ok=True)
    for name, recs in zip(names, (train or zsre_records(7), val or zsre_records(5))):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return directory


def data_cfg(**kw):
    cfg = OmegaConf.structured(DataConfig)
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def dataset(tmp_path, model=None, tok=None, split="validation", **kw):
    kw.setdefault("path", str(write_zsre(tmp_path / "zsre")))
    tok = tok or word_tokenizer()
    return QADataset(tok, data_cfg(**kw), split, seed=0, cache_dir=str(tmp_path / "cache"), model=model)


# ------------------------------------------------------------------------------------------------
# The zsRE loader
# ------------------------------------------------------------------------------------------------
def test_loader_skips_examples_without_alternatives_or_rephrases_and_drops_the_input_from_its_rephrases(tmp_path):
    recs = zsre_records(4)
    recs[1]["alternatives"] = []
    recs[2]["filtered_rephrases"] = [recs[2]["input"]]  # only the question itself: no rephrase left
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    kept, skipped = read_zsre(path)
    assert skipped == 2 and [r["line"] for r in kept] == [1, 4]
    for r in kept:
        assert r["input"] not in r["rephrases"] and r["rephrases"]
        assert r["answer"] == r["prediction"]  # the first output answer
    ds = dataset(tmp_path, tok=word_tokenizer(), split="train")
    for i in range(len(ds)):
        item = ds[i]
        r = ds.records[i]
        assert item["target"] in r["alternatives"] and item["rephrase"] != item["question"]
        assert item["cond"] == f"{r['prediction']} >> {item['target']} || {item['question']}"


def test_original_file_names_are_found(tmp_path):
    names = ("structured_zeroshot-train-new_annotated_final.jsonl", "structured_zeroshot-dev-new_annotated_final.jsonl")
    d = write_zsre(tmp_path / "orig", names=names)
    ds = QADataset(word_tokenizer(), data_cfg(path=str(d)), "validation", 0, str(tmp_path))
    assert ds.source.name == names[1] and len(ds) == 5


def test_missing_files_and_malformed_lines_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="structured_zeroshot-train-new_annotated_final.jsonl not found"):
        QADataset(word_tokenizer(), data_cfg(path=str(empty)), "train", 0, str(tmp_path))
    d = write_zsre(tmp_path / "bad")
    lines = (d / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-5]  # truncated JSON on line 3
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl, line 3: not valid JSON"):
        QADataset(word_tokenizer(), data_cfg(path=str(d)), "train", 0, str(tmp_path))
    lines[2] = json.dumps({"prediction": "x"})
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: 'input' must be"):
        QADataset(word_tokenizer(), data_cfg(path=str(d)), "train", 0, str(tmp_path))


def test_natural_questions_locality(tmp_path):
    d = write_zsre(tmp_path / "data" / "zsre")
    nq = tmp_path / "data" / "nq"  # the original's layout: data/zsre next to data/nq
    nq.mkdir()
    questions = ["who wrote the river ?", "where was a name born ?"]
    nq_obj = {"questions": questions, "answers": [["paris", "rome"], "lima"]}
    for name in ("train.json", "validation.json"):
        (nq / name).write_text(json.dumps(nq_obj))
    ds = QADataset(word_tokenizer(), data_cfg(path=str(d), zsre_nq=True), "validation", 0, str(tmp_path))
    b = next(ds.edit_generator(4, n=1))
    assert set(b["raw"]["loc"]) <= set(questions) and set(b["raw"]["loc_ans"]) <= {"paris", "lima"}
    (nq / "validation.json").write_text('{"questions": [')
    with pytest.raises(DataError, match="validation.json, line 1"):
        QADataset(word_tokenizer(), data_cfg(path=str(d), zsre_nq=True), "validation", 0, str(tmp_path))
    with pytest.raises(DataError, match="data.nq_path"):
        QADataset(word_tokenizer(), data_cfg(zsre_nq=True), "validation", 0, str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------
# The embedded question set
# ------------------------------------------------------------------------------------------------
def test_embedded_set_paraphrases_alternatives_split_and_determinism(tmp_path):
    from data_classes.facts import load_facts, objects_by_relation

    params = embedded_params(data_cfg(), seed=0)
    splits = build_embedded(params)
    assert splits == build_embedded(params)  # deterministic
    assert splits != build_embedded(embedded_params(data_cfg(), seed=1))
    facts = load_facts()
    obj_of = {(f.country, f.question(0)): f for f in facts}
    pools = objects_by_relation(facts)
    countries = {s: {r["country"] for r in recs} for s, recs in splits.items()}
    assert countries["train"] and countries["validation"] and not countries["train"] & countries["validation"]
    for recs in splits.values():
        for r in recs:
            fact = obj_of[(r["country"], r["input"])]
            assert r["output"] == [{"answer": fact.obj}]
            assert len(r["filtered_rephrases"]) == 3 and r["input"] not in r["filtered_rephrases"]
            assert all(fact.country in q for q in r["filtered_rephrases"])
            assert r["alternatives"] and fact.obj not in r["alternatives"]
            assert set(r["alternatives"]) <= set(pools[fact.relation])  # same type of answer
    # written once, atomically, to the cache; later loads read the files
    out = ensure_embedded(str(tmp_path), data_cfg(), 0).dir
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    again = ensure_embedded(str(tmp_path), data_cfg(), 0).dir
    assert again == out and (out / "train.jsonl").stat().st_mtime_ns == stamp
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    ds = QADataset(word_tokenizer(), data_cfg(), "validation", 0, str(tmp_path))
    assert len(ds) == len(splits["validation"])
    # locality questions come from other countries
    for i in range(0, len(ds), 17):
        q, _ = ds._loc(i, 0)
        assert ds.records[i]["country"] not in q


# ------------------------------------------------------------------------------------------------
# Batches by model kind
# ------------------------------------------------------------------------------------------------
def _model_loss(model, role):
    with torch.no_grad():
        return model(**role).loss.item()


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_seq2seq_batches_line_up_with_the_models_own_loss(tmp_path, arch):
    tok = word_tokenizer(arch)
    model = tiny_bart(len(tok)) if arch == "bart" else tiny_t5(len(tok))
    ds = dataset(tmp_path, model=model, tok=tok)
    b = next(ds.edit_generator(4, n=1))
    for role in ("edit_inner", "edit_outer", "loc"):
        t = b[role]
        assert set(t) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
        assert t["labels"].shape == t["decoder_input_ids"].shape == t["decoder_attention_mask"].shape
        assert t["input_ids"].shape == t["attention_mask"].shape
        assert ((t["labels"] == -100) == (t["decoder_attention_mask"] == 0)).all()
        assert ((t["input_ids"] == tok.pad_token_id) == (t["attention_mask"] == 0)).all()
        # each label row ends with </s>; the decoder reads the start token, then the labels shifted right
        for row in t["labels"]:
            assert row[row != -100][-1].item() == tok.eos_token_id
        start = 2 if arch == "bart" else 1  # BART starts the decoder with </s>, T5 with the pad token
        assert (t["decoder_input_ids"][:, 0] == start).all()
        shifted = t["labels"][:, :-1].masked_fill(t["labels"][:, :-1] == -100, tok.pad_token_id)
        assert torch.equal(t["decoder_input_ids"][:, 1:], shifted)
        # logits line up with labels without a shift: our nll is the model's own loss
        with torch.no_grad():
            logits = model(**{k: v for k, v in t.items() if k != "labels"}).logits
        ours = masked_log_probs(logits, t["labels"], shift=False)["nll"].item()
        assert ours == pytest.approx(_model_loss(model, t), rel=1e-5)
    assert b["edit_inner"]["labels"].shape[0] == 1 and b["loc"]["labels"].shape[0] == 3
    if arch == "bart":
        assert b["edit_inner"]["labels"][0, 0].item() == tok.bos_token_id  # <s> answer </s>
    assert b["cond"]["input_ids"].shape[0] == 1
    assert tok.decode(b["cond"]["input_ids"][0], skip_special_tokens=True).count(">>") == 1


def test_causal_batches_put_labels_on_the_answer_only(tmp_path):
    tok = word_tokenizer()
    model = tiny_causal(len(tok))
    ds = dataset(tmp_path, model=model, tok=tok)
    b = next(ds.edit_generator(3, n=1))
    for role in ("edit_inner", "edit_outer", "loc"):
        t = b[role]
        assert set(t) == {"input_ids", "attention_mask", "labels"}
        for r in range(t["input_ids"].shape[0]):
            ids, labels, mask = t["input_ids"][r], t["labels"][r], t["attention_mask"][r]
            n = int(mask.sum())
            assert (mask[:n] == 1).all() and (labels[n:] == -100).all()  # right padding, no labels on it
            on = labels != -100
            assert torch.equal(labels[on], ids[on]) and on.any()
            first = int(on.nonzero()[0])
            assert on[first:n].all()  # the answer is the end of the text
            assert "?" in tok.decode(ids[:first]) and "?" not in tok.decode(ids[first:n])
        ours = masked_log_probs(model(**{k: v for k, v in t.items() if k != "labels"}).logits, t["labels"])["nll"]
        assert ours.item() == pytest.approx(_model_loss(model, t), rel=1e-5)
    assert tok.decode(b["edit_inner"]["input_ids"][0][b["edit_inner"]["labels"][0] != -100]) == b["raw"]["target"][0]


def test_multi_edit_batches_and_generator_semantics(tmp_path):
    tok = word_tokenizer()
    ds = dataset(tmp_path, model=tiny_bart(len(tok)), tok=tok, split="train", n_edits=3)
    b = next(ds.edit_generator(5))
    assert b["edit_inner"]["input_ids"].shape[0] == b["edit_outer"]["input_ids"].shape[0] == 3
    assert b["cond"]["input_ids"].shape[0] == 3 and b["loc"]["input_ids"].shape[0] == 2
    assert len(b["raw"]["target"]) == 3
    stream = ds.edit_generator(5)
    batches = [next(stream) for _ in range(4)]
    resumed = next(ds.edit_generator(5, start=3))
    assert resumed["raw"] == batches[3]["raw"]  # resume at a given batch
    val = dataset(tmp_path, model=tiny_bart(len(tok)), tok=tok, n_edits=2)
    assert [x["raw"] for x in val.edit_generator(3, n=4)] == [x["raw"] for x in val.edit_generator(3, n=4)]
    with pytest.raises(DataError, match="must be smaller than batch_size"):
        ds.edit_generator(3)


# ------------------------------------------------------------------------------------------------
# The editors on encoder-decoder models
# ------------------------------------------------------------------------------------------------
def _seq2seq_config(arch: str, alg: str, **overrides):
    inner, cls = (
        (BART_INNER, "BartForConditionalGeneration") if arch == "bart" else (T5_INNER, "T5ForConditionalGeneration")
    )
    base = {
        "alg": alg,
        "task": "qa",
        "model.name": f"tiny-{arch}",
        "model.class_name": cls,
        "model.kind": "seq2seq",
        "model.inner_params": inner,
        "efk.lstm_hidden": 16,
        "efk.condition_dim": 16,
        "efk.hidden_dim": 16,
    }
    return make_config("llama", **{k.replace(".", "__"): v for k, v in {**base, **overrides}.items()})


def _editor(arch, alg, model, train_set=None, **overrides):
    cls = {"mend": "MEND", "efk": "EFK", "enn": "ENN", "ft": "FT"}[alg]
    cls = f"algs.{alg}.editor.{cls}"
    module, name = cls.rsplit(".", 1)
    import importlib

    editor = getattr(importlib.import_module(module), name)(model, _seq2seq_config(arch, alg, **overrides))
    editor.attach_training_data(train_set)
    return editor


@pytest.mark.parametrize("arch", ["bart", "t5"])
@pytest.mark.parametrize("alg", ["mend", "efk", "enn", "ft"])
def test_editor_contract_on_seq2seq(tmp_path, arch, alg):
    tok = word_tokenizer(arch)
    model = tiny_bart(len(tok)) if arch == "bart" else tiny_t5(len(tok))
    inner = BART_INNER if arch == "bart" else T5_INNER
    ds = dataset(tmp_path, model=model, tok=tok, split="train", n_edits=2)
    batch = next(ds.edit_generator(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # MEND without normalisation and ENN are one gradient step at initialisation; FT fine-tunes
    step = 30.0 if arch == "bart" else 1e-1
    overrides = {"mend.norm": False, "mend.edit_lr": step, "enn.edit_lr": step, "ft.lr": 1e-2, "ft.opt": "Adam"}
    editor = _editor(arch, alg, model, ds, **overrides)
    editor.train(alg != "mend")
    edited, info = editor.edit(batch["edit_inner"], batch["cond"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before), "the base model's weights changed"
    state = edited.edited_state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert changed == set(inner), changed
    loss_before = editor.loss_with(batch["edit_inner"], {})["nll"].item()
    loss_after = edited.loss_with(batch["edit_inner"], {})["nll"].item()
    if alg != "efk":  # EFK's conditioned update is random before training: see the next test
        assert loss_after < loss_before - 1e-3, (loss_before, loss_after)
    if alg == "mend":  # the factors were captured on encoder and decoder layers, padding left out
        n_enc = int(batch["edit_inner"]["attention_mask"].sum())
        n_dec = int(batch["edit_inner"]["decoder_attention_mask"].sum())
        u, _ = edited.last_factors[inner[0]]
        assert u.shape[0] <= n_enc
        u, _ = edited.last_factors[inner[-1]]
        assert u.shape[0] <= n_dec


# How far below the untrained editor's loss/total_edit_val (0.4110 MEND, 0.4126 EFK) the trained one must end.
# Measured over seeds 0, 1, 2: MEND 0.3846, 0.3846, 0.3847 (gap 0.026, seed spread 0.0001); EFK 0.3951, 0.3952,
# 0.3946 (gap 0.017 to 0.018, spread 0.0006).
@pytest.mark.parametrize(
    "alg, steps, overrides, beats_untrained", [("mend", 30, {}, 0.02), ("efk", 60, {"efk.lr": 3e-2}, 0.01)]
)
def test_learned_editors_train_on_qa(tmp_path, alg, steps, overrides, beats_untrained):
    from evaluation import train_and_evaluate
    from trainer import EditTrainer

    tok = word_tokenizer()
    model = tiny_bart(len(tok))
    train = dataset(tmp_path, model=model, tok=tok, split="train")
    val = dataset(tmp_path, model=model, tok=tok, split="validation")
    settings = {
        "mend.lr": 1e-3,
        "mend.lr_lr": 1e-2,
        "mend.edit_lr": 1e-2,
        "accumulate_bs": 1,
        "max_iters": steps,
        "val_interval": steps,
        "val_steps": 5,
        "log_interval": 1000,
        "save": False,
        "eval.final_steps": 5,
        **overrides,
    }
    cfg = _seq2seq_config("bart", alg, **settings)

    def factory():
        editor = _editor("bart", alg, model, train, **settings)
        return editor

    torch.manual_seed(0)
    report = train_and_evaluate(EditTrainer(factory, cfg, train, val, str(tmp_path / "run")))
    res = report["results"]
    assert res["edit/log_prob_val"] > res["edit/log_prob_pre_val"], res
    assert res["loss/total_edit_val"] < report["untrained"]["loss/total_edit_val"] - beats_untrained, report
    assert "acc/drawdown_val" in res


# ------------------------------------------------------------------------------------------------
# Model configs and impossible combinations
# ------------------------------------------------------------------------------------------------
def _compose(*overrides):
    return compose_config(overrides)


@pytest.mark.parametrize(
    "name, cls, layers",
    [
        ("bart-base", "BartForConditionalGeneration", 6),
        ("t5small", "T5ForConditionalGeneration", 8),
        ("t5large", "T5ForConditionalGeneration", 24),
        ("t5xl", "T5ForConditionalGeneration", 24),
        ("t5xxl", "T5ForConditionalGeneration", 24),
    ],
)
def test_the_papers_qa_model_configs(name, cls, layers):
    from models import check_inner_params

    cfg = _compose("+alg=mend", "+experiment=qa", f"+model={name}")
    assert cfg.task == "qa" and cfg.model.kind == "seq2seq" and cfg.model.class_name == cls
    validate_config(cfg, algs=ALGS, tasks=DATASETS)
    # the inner_params exist, as 2-D weights, in a tiny model of the same architecture and depth
    if cls.startswith("Bart"):
        c = transformers.BartConfig(
            vocab_size=16, d_model=8, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=1,
            decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(c)
    else:
        c = transformers.T5Config(
            vocab_size=16, d_model=8, d_ff=8, d_kv=4, num_layers=layers, num_heads=1, feed_forward_proj="gated-gelu"
        )
        model = transformers.T5ForConditionalGeneration(c)
    check_inner_params(model, list(cfg.model.inner_params))
    assert len(cfg.model.inner_params) == (8 if cls.startswith("Bart") else 12)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+experiment=qa", "+model=bert-base"], "(kind classifier) cannot run experiment 'qa'; it runs: fc"),
        (["+experiment=gen", "+model=bart-base"], "(kind seq2seq) cannot run experiment 'gen'; it runs: qa"),
        (["+experiment=gen", "+model=t5small"], "cannot run experiment 'gen'; it runs: qa"),
    ],
)
def test_impossible_combinations_are_refused(overrides, message):
    cfg = _compose("+alg=mend", *overrides)
    validate_config(cfg, algs=ALGS, tasks=DATASETS)  # the data set, not the schema, says which models it serves
    with pytest.raises(ConfigError) as e:
        check_model_kind(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    # causal LMs run both gen and qa
    validate_config(_compose("+alg=mend", "+experiment=qa", "+model=smollm2"), algs=ALGS, tasks=DATASETS)


def test_experiment_order_does_not_change_the_config():
    a = _compose("+alg=mend", "+experiment=qa", "+model=smollm2")
    b = _compose("+model=smollm2", "+experiment=qa", "+alg=mend")
    assert OmegaConf.to_container(a) == OmegaConf.to_container(b)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qa_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    out = {"root": root, "data": str(write_zsre(root / "zsre", zsre_records(12), zsre_records(6)))}
    for arch in ("bart", "t5"):
        tok = word_tokenizer(arch)
        model = tiny_bart(len(tok)) if arch == "bart" else tiny_t5(len(tok))
        model.save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = str(root / arch)
    tok = word_tokenizer()
    tiny_causal(len(tok)).save_pretrained(root / "causal")
    tok.save_pretrained(root / "causal")
    out["causal"] = str(root / "causal")
    return out


def _run_cli(ws, arch, alg, *extra):
    model_cfg = {"bart": "bart-base", "t5": "t5small", "causal": "distilgpt2"}[arch]
    inner = {"bart": BART_INNER, "t5": T5_INNER, "causal": ["transformer.h.1.mlp.c_fc.weight"]}[arch]
    run_dir = ws["root"] / f"run-{arch}-{alg}"
    cmd = [
        sys.executable,
        "-m",
        "run",
        f"+alg={alg}",
        "+experiment=qa",
        f"+model={model_cfg}",
        f"model.name={ws[arch]}",
        f"model.tokenizer_name={ws[arch]}",
        "model.tokenizer_class=AutoTokenizer",
        "model.embedding_module=null",
        f"model.inner_params=[{','.join(inner)}]",
        f"cache_dir={ws['root'] / 'cache'}",
        "device=cpu",
        "wandb.enabled=false",
        "mend.rank=8",
        "efk.lstm_hidden=8",
        "efk.condition_dim=8",
        "efk.hidden_dim=8",
        "max_iters=4",
        "val_interval=4",
        "val_steps=3",
        "log_interval=2",
        "accumulate_bs=2",
        "ft.max_edit_steps=5",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize(
    "arch, alg, extra",
    [
        # MEND and each baseline once, over both encoder-decoder families, a multi-edit batch and a causal LM on the
        # embedded question set (each run costs ~15 s, mostly imports)
        ("bart", "mend", ["data.n_edits=2", "batch_size=3", "val_batch_size=3"]),
        ("t5", "efk", []),
        ("bart", "enn", []),
        ("causal", "ft", ["data.path=null"]),
    ],
)
def test_qa_runs_from_the_command_line(qa_workspace, arch, alg, extra):
    if "data.path=null" not in extra:
        extra = [f"data.path={qa_workspace['data']}", *extra]
    report = _run_cli(qa_workspace, arch, alg, *extra)
    assert report["config"]["task"] == "qa" and report["config"]["alg"] == alg
    assert report["train"]["steps"] == (0 if alg == "ft" else 4)
    res = report["results"]
    for key in ("edit/acc_val", "acc/pre_val", "acc/post_val", "acc/drawdown_val", "time/edit_val"):
        assert key in res, key


ZSRE_MEND = os.path.join(os.path.dirname(__file__), "fixtures", "zsre_mend")


def test_the_zsre_mend_json_format_is_read_with_its_own_locality_questions(tmp_path):
    tok = word_tokenizer()
    ds = QADataset(tok, data_cfg(path=ZSRE_MEND), "train", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
    assert len(ds) == 3 and ds.source.name == "zsre_mend_train.json"
    r = ds.records[0]
    assert (r["input"], r["alt"], r["answer"]) == (
        "What university did Watts Humphrey attend?", "University of Michigan", "Trinity College"
    )  # fmt: skip
    assert r["rephrase"] == "Which university did Watts Humphrey go to?"
    batch = next(ds.edit_generator(2))
    loc_q, loc_a = batch["raw"]["loc"][0], batch["raw"]["loc_ans"][0]
    assert not loc_q.startswith("nq question") and (loc_q, loc_a) in [rec["loc"] for rec in ds.records]
    val = QADataset(tok, data_cfg(path=ZSRE_MEND), "validation", seed=0, cache_dir=str(tmp_path),
                    model=tiny_causal(len(tok)))  # fmt: skip
    assert val.source.name == "zsre_mend_eval.json" and len(val) == 2


def test_a_bad_zsre_mend_record_names_the_file_record_and_field(tmp_path):
    records = json.loads(open(os.path.join(ZSRE_MEND, "zsre_mend_train.json")).read())
    del records[1]["alt"]
    (tmp_path / "zsre_mend_train.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"zsre_mend_train.json, record 1: 'alt' must be a string"):
        read_zsre(tmp_path / "zsre_mend_train.json")


def fake_datasets(splits):
    """A stand-in for the `datasets` package whose load_dataset returns ``splits`` (or raises it)."""
    fake = types.ModuleType("datasets")

    def load_dataset(dataset_id, *args, **kwargs):
        if isinstance(splits, Exception):
            raise splits
        return splits

    fake.load_dataset = load_dataset
    return fake


def test_zsre_mend_records_load_from_a_hub_dataset_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the stand-in plays a dataset in the local cache; no probe of the hub
    train = json.loads(open(os.path.join(ZSRE_MEND, "zsre_mend_train.json")).read())
    evals = json.loads(open(os.path.join(ZSRE_MEND, "zsre_mend_eval.json")).read())
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"train": train, "test": evals}))
    tok = word_tokenizer()
    cfg = data_cfg(path="hf:someone/zsre")
    ds = QADataset(tok, cfg, "train", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
    assert len(ds) == 3 and ds.source == "hf:someone/zsre"
    assert ds.records[0]["input"] == "What university did Watts Humphrey attend?"
    val = QADataset(tok, cfg, "validation", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
    assert len(val) == 2  # the dataset's "test" split
    train[1]["alt"] = 3
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets({"train": train}))
    with pytest.raises(DataError, match=r"hf:someone/zsre, record 1: 'alt' must be a string"):
        QADataset(tok, cfg, "train", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
    with pytest.raises(DataError, match=r"has the splits \['train'\], none of \['validation'"):
        QADataset(tok, cfg, "validation", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))


def test_a_hub_dataset_offline_or_without_datasets_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # load_dataset is asked (the local cache) and fails
    tok = word_tokenizer()
    cfg = data_cfg(path="hf:someone/zsre")
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(ConnectionError("hub unreachable")))
    with pytest.raises(DataError, match=r"hf:someone/zsre: the dataset could not be loaded \(ConnectionError.*"
                       r"Offline, download zsre_mend_train.json and zsre_mend_eval.json"):  # fmt: skip
        QADataset(tok, cfg, "train", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install datasets"):
        QADataset(tok, cfg, "train", seed=0, cache_dir=str(tmp_path), model=tiny_causal(len(tok)))
