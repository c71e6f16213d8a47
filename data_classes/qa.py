"""Data for the ``qa`` experiment (zsRE question answering): make a model give a new answer to a question.

An edit example is a question x_e and an alternative answer y_e (a plausible but different answer, drawn
with a seeded choice from the example's ``alternatives``). The equivalence input x'_e is a rephrasing of
the question (``filtered_rephrases``, with the question itself removed); locality inputs are other
questions with their true answers. The condition text for EFK is ``"<prediction> >> <alternative> || <question>"``.

Sources:

* ``data.path``: a directory holding the zsRE files of De Cao et al. as the original MEND uses them,
  ``structured_zeroshot-train-new_annotated_final.jsonl`` and ``structured_zeroshot-dev-new_annotated_final.jsonl``
  (``train.jsonl`` and ``validation.jsonl`` / ``dev.jsonl`` are accepted too). JSON lines, each
  ``{"input": question, "prediction": the model's answer, "alternatives": [answers], "filtered_rephrases": [questions],
  "output": [{"answer": ...}, ...]}``. Examples without alternatives or (other) rephrases are skipped.
* ``data.path``: a directory holding ``zsre_mend_train.json`` and ``zsre_mend_eval.json``, the JSON format in which
  MEND's later users ship zsRE (EasyEdit, MEMIT): a list of ``{"subject", "src": question, "pred", "rephrase",
  "alt": new answer, "answers": [true answers], "loc": "nq question: ...", "loc_ans", "cond"}``; each record's
  ``loc`` / ``loc_ans`` is its locality question (from Natural Questions) with its answer.
* ``data.path=hf:<dataset id>``: a dataset on the HuggingFace hub in that format, through the ``datasets`` package
  (train: its ``train`` split; validation: ``validation``, ``eval``, ``test`` or ``dev``).
* ``data.zsre_nq=True``: locality questions come from Natural Questions, in the original's format
  ``{"questions": [...], "answers": [...]}`` (an answer may be a string or a list whose first entry is used),
  one file per split: ``train.json`` and ``validation.json`` (or ``dev.json``) in the directory ``data.nq_path``,
  by default ``<data.path>/nq`` or, as in the original's ``data/zsre`` + ``data/nq`` layout, ``<data.path>/../nq``.
* otherwise the embedded set: one question per fact of :mod:`data_classes.facts` (country capitals, regions,
  demonyms, languages, currencies), its three other question templates as rephrases, the true object as the
  answer and objects of the same relation as alternatives; train and validation are split by country. It is
  written once, in the zsRE format above, to ``<cache_dir>/data/qa/<key>/{train,validation}.jsonl``.
* with ``data.facts=large``, the large embedded set of some 15,000 facts about places (:mod:`data_classes.large_facts`)
  in the ``zsre_mend`` format above (each with its own locality question about another place), written once to
  ``<cache_dir>/data/qa/<key>/{train,validation}.json``.

Batches follow the model (see :class:`QADataset`): for a causal LM the question and the answer are one text
(``"<question> <answer>"``) with labels on the answer tokens only; for an encoder-decoder (BART, T5) the question
is the encoder input, the labels are the tokenised answer (with its end-of-sequence token) and
``decoder_input_ids`` are the labels shifted right behind the model's decoder start token (``</s>`` for BART,
the pad token for T5), exactly what the model builds itself from ``labels``, so logits and labels line up
without a shift.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from losses import IGNORE

from . import DataError
from .base import EditDataset, hub_id_hint, hub_rows, normalise_split, read_jsonl
from .base import rng as _rng
from .batches import pad_rows, prompt_target_batch
from .embedded import EmbeddedSet
from .facts import FACT_PACKAGES, RELATIONS, load_facts, objects_by_relation, other_object, split_countries
from .large_facts import ensure_zsre_mend, wants_large

LOG = logging.getLogger(__name__)

CACHE_FORMAT = 1
N_ALTERNATIVES = 3  # alternatives per embedded question
TRAIN_FILES = ("structured_zeroshot-train-new_annotated_final.jsonl", "train.jsonl", "zsre_mend_train.json")
VALIDATION_FILES = (
    "structured_zeroshot-dev-new_annotated_final.jsonl",
    "validation.jsonl",
    "dev.jsonl",
    "zsre_mend_eval.json",
)
MEND_FORMAT_HINT = (
    'a JSON list of {"src": question, "alt": new answer, "rephrase": question, "answers": [answers], '
    '"loc": "nq question: ...", "loc_ans": answer, "pred"?: answer}'
)
NQ_FILES = {"train": ("train.json",), "validation": ("validation.json", "dev.json")}
FORMAT_HINT = (
    'one JSON object per line: {"input": question, "prediction": answer, "alternatives": [answers], '
    '"filtered_rephrases": [questions], "output": [{"answer": ...}]}'
)
NQ_HINT = '{"questions": [...], "answers": [...]}'

_SALT_ALT, _SALT_REPHRASE, _SALT_LOC, _SALT_TRAIN_ORDER, _SALT_EVAL_ORDER, _SALT_EMBED = range(6)


def _find(directory: Path, names: Sequence[str], what: str, key: str) -> Path:
    if not directory.is_dir():
        raise DataError(
            f"{key}={str(directory)!r} is not a directory; it must hold {' or '.join(names)} ({what})."
            + (hub_id_hint(directory) if key == "data.path" else "")
        )
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"{directory / names[0]} not found: {key}={str(directory)!r} must hold {' or '.join(names)} ({what})."
    )


def zsre_file(directory: Path, split: str) -> Path:
    names = TRAIN_FILES if split == "train" else VALIDATION_FILES
    return _find(directory, names, f"zsRE {split} split, {FORMAT_HINT}", "data.path")


# --------------------------------------------------------------------------------------------
# Reading the original formats


def read_zsre_mend(path: Path) -> Tuple[List[dict], int]:
    """The records of a zsRE file in the JSON format MEND's later users ship (``zsre_mend_train.json``,
    ``zsre_mend_eval.json``: EasyEdit, MEMIT), with each record's own locality question (``loc``, its ``nq
    question: `` prefix removed) and answer (``loc_ans``). A record of the wrong shape raises DataError naming
    the file, the record and the field."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}).") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); expected {MEND_FORMAT_HINT}.") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected {MEND_FORMAT_HINT}.")
    return zsre_mend_records(items, str(path))


def read_zsre_hub(dataset_id: str, split: str) -> Tuple[List[dict], int]:
    """The records of one split of a zsRE dataset in the ``zsre_mend_*.json`` format on the HuggingFace hub (train:
    its ``train`` split; validation: ``validation``, ``eval``, ``test`` or ``dev``, the first it has)."""
    names = ("train",) if split == "train" else ("validation", "eval", "test", "dev")
    hint = "download zsre_mend_train.json and zsre_mend_eval.json elsewhere and set data.path=<their directory>"
    return zsre_mend_records(hub_rows(dataset_id, names, hint), f"hf:{dataset_id}")


def zsre_mend_records(items: Sequence, source: str) -> Tuple[List[dict], int]:
    """(usable records, skipped count) of ``zsre_mend_*.json`` items (see :func:`read_zsre_mend`)."""
    records, skipped = [], 0
    for i, d in enumerate(items):
        where = f"{source}, record {i}"
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}.")
        for key in ("src", "alt", "rephrase", "loc", "loc_ans"):
            if not isinstance(d.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string; expected {MEND_FORMAT_HINT}.")
        answers = d.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: 'answers' must be a list of strings.")
        prediction = d.get("pred") if isinstance(d.get("pred"), str) else ""
        answer = next((a for a in answers if a.strip()), prediction)
        question, rephrase = d["src"].strip(), d["rephrase"].strip()
        loc = d["loc"].strip()
        loc = loc[len("nq question:") :].strip() if loc.lower().startswith("nq question:") else loc
        if not question or not d["alt"].strip() or not answer.strip() or not rephrase or rephrase == question:
            skipped += 1
            continue
        records.append(
            {
                "input": question,
                "prediction": prediction or answer,
                "alternatives": [d["alt"].strip()],
                "rephrases": [rephrase],
                "answer": answer,
                "country": None,
                "line": i,
                "loc": (loc, d["loc_ans"].strip()) if loc and d["loc_ans"].strip() else None,
            }
        )
    return records, skipped


def read_zsre(path: Path) -> Tuple[List[dict], int]:
    """The usable records of a zsRE JSON-lines file (or of a ``zsre_mend_*.json`` file: :func:`read_zsre_mend`),
    and how many were skipped.

    Each record: input, prediction, alternatives, rephrases (input removed), answer (the first ``output`` answer,
    else the prediction), plus any ``country`` key (the embedded set's, for locality). A line that is not a JSON
    object of the right shape raises DataError naming the file and the line.
    """
    if Path(path).suffix == ".json":
        return read_zsre_mend(path)
    records, skipped = [], 0
    for lineno, where, d in read_jsonl(path, DataError, f"expected {FORMAT_HINT}"):
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(d).__name__}.")
        question = d.get("input")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: 'input' must be a non-empty string (the question).")
        for key in ("alternatives", "filtered_rephrases", "output"):
            if key in d and not isinstance(d[key], list):
                raise DataError(f"{where}: {key!r} must be a list, got {type(d[key]).__name__}.")
        alternatives = [a for a in d.get("alternatives") or [] if isinstance(a, str) and a.strip()]
        rephrases = [r for r in d.get("filtered_rephrases") or [] if isinstance(r, str) and r.strip()]
        rephrases = [r for r in rephrases if r.strip() != question.strip()]
        prediction = d.get("prediction") if isinstance(d.get("prediction"), str) else ""
        answers = [
            o["answer"] for o in d.get("output") or [] if isinstance(o, dict) and isinstance(o.get("answer"), str)
        ]
        answer = next((a for a in answers if a.strip()), prediction)
        if not alternatives or not rephrases or not answer.strip():
            skipped += 1
            continue
        records.append(
            {
                "input": question,
                "prediction": prediction or answer,
                "alternatives": alternatives,
                "rephrases": rephrases,
                "answer": answer,
                "country": d.get("country"),
                "line": lineno,
            }
        )
    return records, skipped


def read_nq(path: Path) -> List[Tuple[str, str]]:
    """(question, answer) pairs from a Natural Questions file in the original's format."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}).") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); expected {NQ_HINT}.") from e
    if (
        not isinstance(obj, dict)
        or not isinstance(obj.get("questions"), list)
        or not isinstance(obj.get("answers"), list)
    ):
        raise DataError(f"{path}: expected a JSON object {NQ_HINT}.")
    if len(obj["questions"]) != len(obj["answers"]):
        raise DataError(f"{path}: {len(obj['questions'])} questions but {len(obj['answers'])} answers.")
    pairs = []
    for q, a in zip(obj["questions"], obj["answers"]):
        if isinstance(a, list):
            a = next((x for x in a if isinstance(x, str) and x.strip()), None)
        if isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip():
            pairs.append((q, a))
    if not pairs:
        raise DataError(f"{path}: no usable question/answer pair; expected {NQ_HINT}.")
    return pairs


def nq_file(data_cfg, split: str) -> Path:
    nq_path = data_cfg.nq_path
    if nq_path:
        return _find(
            Path(os.path.expanduser(str(nq_path))), NQ_FILES[split], f"Natural Questions {NQ_HINT}", "data.nq_path"
        )
    path = data_cfg.path
    if not path:
        raise DataError(
            "data.zsre_nq=True takes locality questions from Natural Questions files, which the embedded set does not "
            "have: set data.nq_path=<directory with train.json and validation.json> (or data.zsre_nq=False)."
        )
    root = Path(os.path.expanduser(str(path)))
    for candidate in (root / "nq", root.parent / "nq"):
        if candidate.is_dir():
            return _find(candidate, NQ_FILES[split], f"Natural Questions {NQ_HINT}", "data.nq_path")
    raise DataError(
        f"data.zsre_nq=True: no Natural Questions directory at {root / 'nq'} or {root.parent / 'nq'}; set "
        f"data.nq_path=<directory with {' and '.join(n[0] for n in NQ_FILES.values())}> ({NQ_HINT})."
    )


# --------------------------------------------------------------------------------------------
# The embedded set


def embedded_params(data_cfg, seed: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "facts": FACT_PACKAGES,
        "seed": int(seed),
        "val_fraction": float(data_cfg.val_fraction),
        "n_alternatives": N_ALTERNATIVES,
    }


def build_embedded(params: dict) -> Dict[str, List[dict]]:
    """Both splits of the embedded question set as zsRE records (plus each fact's country and relation)."""
    val_fraction = params["val_fraction"]
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1.")
    facts = load_facts()
    pools = objects_by_relation(facts)
    train_c, _ = split_countries(facts, val_fraction, params["seed"])
    train_c = set(train_c)
    out: Dict[str, List[dict]] = {"train": [], "validation": []}
    for i, fact in enumerate(facts):
        rng = _rng(params["seed"], _SALT_EMBED, i)
        alternatives: List[str] = []
        n_distinct = len(pools[fact.relation]) - 1
        while len(alternatives) < min(params["n_alternatives"], n_distinct):
            alt = other_object(fact, pools, rng)
            if alt not in alternatives:
                alternatives.append(alt)
        if not alternatives:
            continue
        out["train" if fact.country in train_c else "validation"].append(
            {
                "input": fact.question(0),
                # The embedded set has no model answer; the true object stands in for it (used in EFK's condition).
                "prediction": fact.obj,
                "alternatives": alternatives,
                "filtered_rephrases": [fact.question(k) for k in range(1, len(_questions(fact)))],
                "output": [{"answer": fact.obj}],
                "country": fact.country,
                "relation": fact.relation,
            }
        )
    return out


def _questions(fact) -> Tuple[str, ...]:
    return RELATIONS[fact.relation][1]


def ensure_embedded(cache_dir: str, data_cfg, seed: int) -> EmbeddedSet:
    """The embedded question set in the data cache (``train.jsonl``, ``validation.jsonl``), built once."""
    params = embedded_params(data_cfg, seed)
    return EmbeddedSet("qa", params, cache_dir, noun="questions").ensure(lambda _: build_embedded(params))


# --------------------------------------------------------------------------------------------
# The dataset


def seq2seq_start_id(model) -> Optional[int]:
    """The decoder start token of an encoder-decoder model (BART: </s>, T5: the pad token)."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        start = config.pad_token_id if getattr(config, "model_type", "") == "t5" else config.eos_token_id
    return int(start)


class QADataset(EditDataset):
    """zsRE-style edit examples of one split and the batches the trainer consumes (see :meth:`edit_generator`).

    ``model`` decides the batch layout: an encoder-decoder model (``config.is_encoder_decoder``) gets encoder
    inputs, labels, ``decoder_input_ids`` and ``decoder_attention_mask``; any other model is treated as a causal LM.
    """

    model_kinds = ("causal_lm", "seq2seq")  # the model.kind values it serves (data_classes.check_model_kind)

    TRAIN_ORDER_SALT = _SALT_TRAIN_ORDER
    EVAL_ORDER_SALT = _SALT_EVAL_ORDER
    LOC_NAME = "locality question"

    def __init__(
        self,
        tokenizer,
        data_cfg,
        split: str,
        seed: int,
        cache_dir: str,
        model=None,
        model_id: str = "",
        device="cpu",
    ):
        self._setup(tokenizer, data_cfg, split, seed, model)
        path = data_cfg.path
        if path and str(path).startswith("hf:"):
            self.source = str(path)
            records, skipped = read_zsre_hub(self.source[3:], self.split)
        elif path:
            self.source = zsre_file(Path(os.path.expanduser(str(path))), self.split)
            records, skipped = read_zsre(self.source)
        else:
            if wants_large(data_cfg):
                embedded = ensure_zsre_mend(cache_dir, data_cfg, self.seed)
            else:
                embedded = ensure_embedded(cache_dir, data_cfg, self.seed)
            self.source = embedded.file(self.split)
            records, skipped = embedded.read(self.split, read_zsre)
        if skipped:
            LOG.info(
                "%s: %d examples without alternatives or rephrases skipped (as the original does).",
                self.source,
                skipped,
            )
        if not records:
            raise DataError(
                f"{self.source}: no usable example (each needs alternatives and a rephrase); {FORMAT_HINT}."
            )
        self.records = records
        for i, r in enumerate(records):
            r["alt"] = r["alternatives"][int(_rng(self.seed, _SALT_ALT, i).integers(len(r["alternatives"])))]
            r["rephrase"] = r["rephrases"][int(_rng(self.seed, _SALT_REPHRASE, i).integers(len(r["rephrases"])))]
            r["cond"] = f"{r['prediction']} >> {r['alt']} || {r['input']}"
        self.nq: Optional[List[Tuple[str, str]]] = None
        own = [r["loc"] for r in records if r.get("loc")]
        if data_cfg.zsre_nq:
            self.nq = read_nq(nq_file(data_cfg, self.split))
        elif own:  # zsre_mend_*.json: each record brings its locality question (from Natural Questions)
            self.nq = own
        elif len(records) < 2:
            raise DataError(f"{self.source}: the {self.split} split needs at least 2 examples (locality uses others).")
        LOG.info("qa %s split: %d edit examples from %s", self.split, len(self), self.source)

    def _setup(self, tokenizer, data_cfg, split: str, seed: int, model) -> None:
        """What every question-and-answer style set needs before its records: the tokenizer, the split, the seed
        and the batch layout of the model."""
        self.tok = tokenizer
        self.cfg = data_cfg
        self.split = normalise_split(split)
        self.seed = int(seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise DataError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.start_id = seq2seq_start_id(model) if self.seq2seq else None
        self.eos_id = tokenizer.eos_token_id
        self._enc_cache: Dict[Tuple[str, str], Tuple[List[int], List[int]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        q, a = self._loc(i, 0)
        return {
            "question": r["input"],
            "target": r["alt"],
            "rephrase": r["rephrase"],
            "answer": r["answer"],
            "cond": r["cond"],
            "loc": q,
            "loc_ans": a,
        }

    # ---- locality

    def _rephrase(self, i: int, draw: int = 0) -> str:
        """The equivalence input of edit i in batch ``draw`` (with data.rephrase): its rephrasing."""
        return self.records[i]["rephrase"]

    def _loc(self, i: int, k: int, draw: int = 0) -> Tuple[str, str]:
        """The k-th locality partner of edit i in batch ``draw``: another question with its true answer (another
        country's, for the embedded set), or a Natural Questions pair with data.zsre_nq; a deterministic draw from
        (seed, i, k, draw), so every batch draws anew."""
        rng = _rng(self.seed, _SALT_LOC, i, k, draw)
        if self.nq is not None:
            return self.nq[int(rng.integers(len(self.nq)))]
        r = self.records[i]
        for _ in range(64):
            j = int(rng.integers(len(self.records)))
            other = self.records[j]
            if j != i and (r["country"] is None or other["country"] != r["country"]):
                return other["input"], other["answer"]
        j = (i + 1 + int(rng.integers(len(self.records) - 1))) % len(self.records)
        return self.records[j]["input"], self.records[j]["answer"]

    # ---- tokenisation

    def _ids(self, text: str, special: bool) -> List[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def encode_pair(self, question: str, answer: str) -> Tuple[List[int], List[int]]:
        """(prompt ids, answer ids): encoder input and labels for seq2seq; the two parts of one text for a causal LM."""
        key = (question, answer)
        if key in self._enc_cache:
            return self._enc_cache[key]
        if self.seq2seq:
            prompt = self._ids(question, True)
            target = self._ids(answer, True)
            if self.eos_id is not None and (not target or target[-1] != self.eos_id):
                target = target + [self.eos_id]
        else:
            prompt = self._ids(question, False)
            full = self._ids(question + " " + answer, False)
            if full[: len(prompt)] == prompt and len(full) > len(prompt):
                target = full[len(prompt) :]
            else:  # the tokenizer merges across the boundary: keep the two parts apart
                target = self._ids(" " + answer, False)
        if not target:
            raise DataError(f"{self.source}: the answer {answer!r} tokenises to nothing.")
        self._enc_cache[key] = (prompt, target)
        return prompt, target

    def tensors(self, pairs: List[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
        """One batch role (edit_inner, edit_outer or loc) for (question, answer) pairs."""
        enc = [self.encode_pair(q, a) for q, a in pairs]
        if self.seq2seq:
            ids, mask = pad_rows([p for p, _ in enc], self.pad_id)
            labels, dec_mask = pad_rows([t for _, t in enc], IGNORE)
            # The model's own shift: the decoder reads the start token, then the labels up to the last one.
            dec_ids = torch.full_like(labels, self.pad_id)
            dec_ids[:, 0] = self.start_id
            dec_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE, self.pad_id)
            return {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": labels,
                "decoder_input_ids": dec_ids,
                "decoder_attention_mask": dec_mask,
            }
        return prompt_target_batch(enc, self.pad_id)

    def _batch(self, edits: List[int], n_loc: int, epoch: int = 0, draw: int = 0) -> dict:
        recs = [self.records[i] for i in edits]
        inner = self.tensors([(r["input"], r["alt"]) for r in recs])
        rephrases = [self._rephrase(i, draw) for i in edits]
        if self.cfg.rephrase:
            outer = self.tensors([(q, r["alt"]) for q, r in zip(rephrases, recs)])
        else:
            outer = {k: v.clone() for k, v in inner.items()}
        # Slot k holds partner k // n_edits of edit k % n_edits (as in gen).
        locs = [self._loc(edits[k % len(edits)], k // len(edits), draw) for k in range(n_loc)]
        loc = self.tensors(locs)
        cond_ids, cond_mask = pad_rows([self._ids(r["cond"], True) for r in recs], self.pad_id)
        return {
            "edit_inner": inner,
            "edit_outer": outer,
            "loc": loc,
            "cond": {"input_ids": cond_ids, "attention_mask": cond_mask},
            "raw": {
                "question": [r["input"] for r in recs],
                "target": [r["alt"] for r in recs],
                "rephrase": rephrases,
                "cond": [r["cond"] for r in recs],
                "loc": [q for q, _ in locs],
                "loc_ans": [a for _, a in locs],
            },
        }
