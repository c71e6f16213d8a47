"""Data for the ``gen`` experiment: make a causal LM continue a passage with a sampled target.

An edit example is a passage x_e and a target y_e, an ``n_tokens``-token continuation sampled
from the pre-trained model itself. The equivalence input x'_e is the passage with a random
prefix of up to half its tokens removed; the locality input is another passage, from a
different document of the same split.

Sources:

* ``data.path``: a directory with ``train.json`` and ``validation.json`` (``val.json`` and
  ``valid.json`` are accepted too) in the original MEND format
  ``{"original": [passages], "completions": [passage + continuation], "n_tokens": 10}``.
* otherwise the embedded set: the CIA World Factbook background paragraphs (see
  :mod:`data_classes.corpus`), cut into sentence-aligned passages, split into train and
  validation by country, with targets sampled from the model. The result is cached in the
  original format under ``<cache_dir>/data/gen/<key>/`` and later runs load it without the model.
* ``data.wiki_webtext``: locality passages from OpenWebText (needs the HuggingFace hub).

Two data options size the embedded set (``config_schema.DataConfig``): ``max_documents``
(default None: cap on the number of countries of the embedded corpus, for quick tests) and
``max_passages`` (default 1200: cap on the number of embedded passages whose targets are
sampled, a seeded draw that keeps each split's share; None samples all ~2,265).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import DataError
from .base import EditDataset, normalise_split
from .base import rng as _rng
from .batches import prompt_target_batch
from .corpus import CORPUS_NAME, corpus_version, factbook_documents, split_passages
from .embedded import EmbeddedSet, Progress
from .sampling import sample_continuations

LOG = logging.getLogger(__name__)

# Bump when the embedded build changes in a way that invalidates cached files.
CACHE_FORMAT = 1
MIN_PASSAGE_TOKENS = 16
WEBTEXT_DATASET = "stas/openwebtext-10k"
WEBTEXT_TRAIN_FRACTION = 0.9
VALIDATION_FILES = ("validation.json", "val.json", "valid.json")
FORMAT_HINT = '{"original": [passages], "completions": [passage + sampled continuation], "n_tokens": 10}'

# Salts that keep the seeded random streams of different uses apart.
_SALT_SPLIT, _SALT_LOC, _SALT_REPHRASE, _SALT_TRAIN_ORDER, _SALT_EVAL_ORDER, _SALT_CAP = range(6)


def context_length(model) -> Optional[int]:
    """The longest input ``model`` takes (n_positions / max_position_embeddings of its config), if it says."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# The original file format


def split_file(directory: Path, split: str) -> Path:
    """The file of ``split`` in a data directory; raises DataError saying what is expected."""
    if not directory.is_dir():
        raise DataError(
            f"data.path={str(directory)!r} is not a directory. It must hold train.json and validation.json "
            f"(or val.json / valid.json), each in the MEND gen format {FORMAT_HINT}."
        )
    names = ("train.json",) if split == "train" else VALIDATION_FILES
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"{directory / names[0]} not found: data.path={str(directory)!r} must hold "
        f"{' or '.join(names)} for the {split} split, in the MEND gen format {FORMAT_HINT}."
    )


def read_original(path: Path) -> Tuple[List[str], List[str], Optional[int], dict]:
    """Read and check one file in the original format.

    Returns (passages, targets, n_tokens or None, the whole JSON object). The target is the
    completion with the passage removed; each completion must start with its passage.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected {FORMAT_HINT}.") from e
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected {FORMAT_HINT}.")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); expected {FORMAT_HINT}."
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object {FORMAT_HINT}, got {type(obj).__name__}.")
    for key in ("original", "completions"):
        if key not in obj:
            raise DataError(f"{path}: missing key {key!r}; expected {FORMAT_HINT}.")
        if not isinstance(obj[key], list):
            raise DataError(f"{path}: {key!r} must be a list of strings, got {type(obj[key]).__name__}.")
        for i, s in enumerate(obj[key]):
            if not isinstance(s, str):
                raise DataError(f"{path}: {key}[{i}] must be a string, got {type(s).__name__}.")
    passages, completions = obj["original"], obj["completions"]
    if len(passages) != len(completions):
        raise DataError(
            f"{path}: 'original' has {len(passages)} entries but 'completions' has {len(completions)}; "
            f"they must pair up (completions[i] = original[i] + its sampled continuation)."
        )
    if not passages:
        raise DataError(f"{path}: 'original' and 'completions' are empty.")
    n_tokens = obj.get("n_tokens")
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 1):
        raise DataError(f"{path}: 'n_tokens' must be a positive integer, got {n_tokens!r}.")
    out_passages, targets = [], []
    for i, (p, c) in enumerate(zip(passages, completions)):
        if c.startswith(p):
            target = c[len(p) :]
        elif c.lstrip().startswith(p.strip()):
            p = p.strip()
            target = c.lstrip()[len(p) :]
        else:
            raise DataError(
                f"{path}: completions[{i}] does not start with original[{i}]; each completion must be "
                f"the passage followed by its continuation (original[{i}][:60]={p[:60]!r}, "
                f"completions[{i}][:60]={c[:60]!r})."
            )
        if not target.strip():
            raise DataError(f"{path}: completions[{i}] adds nothing to original[{i}] (empty target).")
        out_passages.append(p)
        targets.append(target)
    return out_passages, targets, n_tokens, obj


# --------------------------------------------------------------------------------------------
# The embedded set


def embedded_params(data_cfg, seed: int, model_id: str) -> dict:
    """Everything the embedded set depends on; its hash names the cache directory."""
    return {
        "format": CACHE_FORMAT,
        "model_id": model_id,
        "corpus": CORPUS_NAME,
        "corpus_version": corpus_version(),
        "seed": int(seed),
        "n_tokens": int(data_cfg.n_tokens),
        "max_passage_tokens": int(data_cfg.max_passage_tokens),
        "min_passage_tokens": MIN_PASSAGE_TOKENS,
        "val_fraction": float(data_cfg.val_fraction),
        "sample_temperature": float(data_cfg.sample_temperature),
        "max_documents": _positive_or_none(data_cfg.max_documents, "max_documents"),
        "max_passages": _positive_or_none(data_cfg.max_passages, "max_passages"),
    }


def _positive_or_none(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if int(value) < 1:
        raise DataError(f"data.{name}={value} must be a positive integer, or null for no limit.")
    return int(value)


def embedded_set(cache_dir: str, params: dict) -> EmbeddedSet:
    """The embedded set built with ``params`` in the data cache: one file a split in the original format (plus the
    keys of :func:`build_embedded`), the parameters in each file's ``meta`` (no params.json)."""
    return EmbeddedSet(
        "gen",
        params,
        cache_dir,
        suffix=".json",
        dump=lambda obj: json.dumps(obj, ensure_ascii=False),
        params_file=None,
        count=lambda obj: len(obj["original"]),
    )


def split_documents(doc_ids: Sequence[str], val_fraction: float, seed: int) -> Tuple[List[str], List[str]]:
    """Seeded shuffle of the document ids; the last ``val_fraction`` of them are the validation split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be strictly between 0 and 1.")
    ids = sorted(doc_ids)
    if len(ids) < 4:
        raise DataError(
            f"The embedded corpus has {len(ids)} documents (data.max_documents?); at least 4 are needed "
            f"so that each split has two documents for locality."
        )
    order = [ids[j] for j in _rng(seed, _SALT_SPLIT).permutation(len(ids))]
    n_val = min(max(2, int(round(val_fraction * len(ids)))), len(ids) - 2)
    return order[: len(ids) - n_val], order[len(ids) - n_val :]


def build_embedded(tokenizer, seed: int, model, params: dict, progress: Optional[Progress] = None) -> Dict[str, dict]:
    """Both splits of the embedded set, each as the object of its file: the original format plus the targets'
    text and ids, the documents, the split and ``meta`` (``params`` and figures of the build). ``progress(done,
    total)`` follows the sampling."""
    start = time.time()
    n_tokens = params["n_tokens"]
    max_tokens = params["max_passage_tokens"]
    docs = factbook_documents()
    if params["max_documents"] is not None:
        docs = docs[: int(params["max_documents"])]
    train_ids, val_ids = split_documents([d for d, _ in docs], params["val_fraction"], seed)
    split_of = {d: "train" for d in train_ids}
    split_of.update({d: "validation" for d in val_ids})

    items: List[Tuple[str, str, str]] = []  # (split, document, passage)
    for doc, text in docs:
        for p in split_passages(text, tokenizer, max_tokens, MIN_PASSAGE_TOKENS):
            items.append((split_of[doc], doc, p))
    cap = params["max_passages"]
    if cap is not None and len(items) > int(cap):
        # Keep the same share of each split, choosing its passages with a seeded draw.
        keep: List[int] = []
        for s, split in enumerate(("train", "validation")):
            members = [i for i, it in enumerate(items) if it[0] == split]
            n_keep = min(len(members), max(2, int(round(int(cap) * len(members) / len(items)))))
            keep.extend(members[j] for j in _rng(seed, _SALT_CAP, s).permutation(len(members))[:n_keep])
        items = [items[i] for i in sorted(keep)]
    LOG.info(
        "Building the embedded gen set: %d passages from %d documents (%d train / %d validation documents); "
        "sampling %d-token targets from %s at temperature %s.",
        len(items),
        len(docs),
        len(train_ids),
        len(val_ids),
        n_tokens,
        params["model_id"] or "the model",
        params["sample_temperature"],
    )
    prompts = [_encode(tokenizer, p) for _, _, p in items]
    t0 = time.time()
    temperature = params["sample_temperature"]
    sampled = sample_continuations(model, tokenizer, prompts, n_tokens, temperature, seed, progress=progress)
    sample_seconds = time.time() - t0
    LOG.info("Sampled %d targets in %.1f s.", len(items), sample_seconds)

    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    splits: Dict[str, dict] = {
        s: {"original": [], "completions": [], "targets": [], "target_ids": [], "documents": []}
        for s in ("train", "validation")
    }
    dropped = {"special_token": 0, "round_trip": 0}
    for (split, doc, passage), prompt, g in zip(items, prompts, sampled):
        if special.intersection(g):
            dropped["special_token"] += 1
            continue
        target = _decode(tokenizer, g)
        if _encode(tokenizer, target) != g or _encode(tokenizer, passage + target) != prompt + g:
            dropped["round_trip"] += 1
            continue
        d = splits[split]
        d["original"].append(passage)
        d["completions"].append(passage + target)
        d["targets"].append(target)
        d["target_ids"].append(g)
        d["documents"].append(doc)
    n_dropped = sum(dropped.values())
    LOG.info(
        "Dropped %d of %d sampled targets (%d containing special tokens, %d whose text does not re-tokenise "
        "to the sampled ids after the passage); kept %d train and %d validation examples.",
        n_dropped,
        len(items),
        dropped["special_token"],
        dropped["round_trip"],
        len(splits["train"]["original"]),
        len(splits["validation"]["original"]),
    )
    for split in ("train", "validation"):
        if len(set(splits[split]["documents"])) < 2:
            raise DataError(
                f"The embedded {split} split has fewer than two documents after sampling; raise "
                f"data.max_documents / data.max_passages."
            )
    meta = dict(
        params,
        n_passages=len(items),
        n_dropped=dropped,
        sample_seconds=round(sample_seconds, 2),
        build_seconds=round(time.time() - start, 2),
    )
    return {split: {"n_tokens": n_tokens, **splits[split], "split": split, "meta": meta} for split in splits}


def read_cached(path: Path) -> Tuple[List[str], List[str], List[str], List[List[int]]]:
    """(passages, targets, documents, target ids) of a file of the embedded set."""
    passages, targets, _, obj = read_original(path)
    for key in ("documents", "target_ids"):
        if not isinstance(obj.get(key), list) or len(obj[key]) != len(passages):
            raise DataError(f"{path}: key {key!r} is missing or does not have {len(passages)} entries.")
    return passages, targets, [str(d) for d in obj["documents"]], obj["target_ids"]


# --------------------------------------------------------------------------------------------
# OpenWebText locality


def webtext_passages(split: str) -> List[str]:
    """OpenWebText documents for locality (the original's ``data.wiki_webtext``): 90% train, 10% validation."""
    hint = "data.wiki_webtext=False takes locality passages from the edit corpus instead."
    try:
        import datasets  # optional: only data.wiki_webtext=True needs it
    except ImportError as e:
        raise DataError(
            f"data.wiki_webtext=True needs the `datasets` package (pip install datasets) and the HuggingFace "
            f"hub to download {WEBTEXT_DATASET}; {hint}"
        ) from e
    try:
        texts = datasets.load_dataset(WEBTEXT_DATASET, split="train")["text"]
    except Exception as e:
        raise DataError(
            f"Locality from OpenWebText (data.wiki_webtext=True) needs the HuggingFace hub to download "
            f"{WEBTEXT_DATASET}, which failed ({type(e).__name__}: {e}); {hint}"
        ) from e
    n_train = int(len(texts) * WEBTEXT_TRAIN_FRACTION)
    texts = texts[:n_train] if split == "train" else texts[n_train:]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{WEBTEXT_DATASET} gave no {split} documents; {hint}")
    return texts


# --------------------------------------------------------------------------------------------
# The dataset


class GenDataset(EditDataset):
    """Edit examples of one split and the batches the trainer consumes (see :meth:`edit_generator`)."""

    model_kinds = ("causal_lm",)  # the model.kind values it serves (data_classes.check_model_kind)

    TRAIN_ORDER_SALT = _SALT_TRAIN_ORDER
    EVAL_ORDER_SALT = _SALT_EVAL_ORDER
    LOC_NAME = "locality passage"

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
        max_length: Optional[int] = None,
    ):
        self.tok = tokenizer
        self.cfg = data_cfg
        self.split = normalise_split(split)
        self.seed = int(seed)
        self.device = device  # generation runs on the model's own device; batches are on the CPU
        self.n_tokens = int(data_cfg.n_tokens)
        self.max_passage_tokens = int(data_cfg.max_passage_tokens)
        # The model's context: no row (passage + target) may be longer. Defaults to the model's own.
        self.max_length = max_length if max_length is not None else context_length(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise DataError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")

        path = data_cfg.path
        stored_ids: Optional[List[List[int]]] = None
        if path:
            self.source = split_file(Path(os.path.expanduser(str(path))), self.split)
            passages, targets, file_n_tokens, _ = read_original(self.source)
            documents = [str(i) for i in range(len(passages))]
            if file_n_tokens is not None and file_n_tokens != self.n_tokens:
                LOG.warning(
                    "%s has n_tokens=%d, data.n_tokens=%d; targets are taken from the file as they are.",
                    self.source,
                    file_n_tokens,
                    self.n_tokens,
                )
        else:
            passages, targets, documents, stored_ids = self._load_embedded(cache_dir, model, model_id)
        self._prepare(passages, targets, documents, stored_ids)

    # ---- loading

    def _load_embedded(self, cache_dir: str, model, model_id: str):
        params = embedded_params(self.cfg, self.seed, model_id)
        embedded = embedded_set(cache_dir, params)

        def build(progress: Progress) -> Dict[str, dict]:
            if model is None:
                raise DataError(
                    f"No cached embedded gen data at {embedded.dir} and no model was given to sample targets from. "
                    f"Pass the model (run.py does so on the first run), or set data.path to a directory "
                    f"with train.json and validation.json."
                )
            return build_embedded(self.tok, self.seed, model, params, progress)

        self.source = embedded.ensure(build).file(self.split)
        return embedded.read(self.split, read_cached)

    # ---- tokenisation, equivalence and locality

    def _prepare(self, passages, targets, documents, stored_ids) -> None:
        tok, m, context = self.tok, self.max_passage_tokens, self.max_length
        self.passages, self.targets, self.documents = [], [], []
        self.passage_ids, self.target_ids = [], []
        n_truncated, n_context, mismatched, too_long = 0, 0, 0, []
        for i, (p, t) in enumerate(zip(passages, targets)):
            t_ids = _encode(tok, t)
            if stored_ids is not None and t_ids != list(stored_ids[i]):
                mismatched += 1
                t_ids = list(stored_ids[i])
            if not t_ids:
                raise DataError(f"{self.source}: example {i} has an empty target after tokenisation.")
            if context is not None and len(t_ids) >= context:
                too_long.append(i)  # not even one passage token fits before the target
                continue
            ids = full = _encode(tok, p)
            if len(ids) > m:
                # Keep the end of the passage, so that the target still continues it.
                ids = ids[-m:]
                n_truncated += 1
            if context is not None and len(ids) + len(t_ids) > context:
                ids = ids[len(ids) + len(t_ids) - context :]
                n_context += 1
            if len(ids) < len(full):
                p = _decode(tok, ids)
            self.documents.append(str(documents[i]))
            self.passages.append(p)
            self.targets.append(t)
            self.passage_ids.append(ids)
            self.target_ids.append(t_ids)
        if n_truncated:
            LOG.info(
                "%s: %d passages longer than data.max_passage_tokens=%d were cut to their last %d tokens.",
                self.source,
                n_truncated,
                m,
                m,
            )
        if n_context:
            LOG.warning(
                "%s: %d passages were cut from the left so that passage + target fit the model's context of %d tokens.",
                self.source,
                n_context,
                context,
            )
        if too_long:
            LOG.warning(
                "%s: %d examples skipped, their target alone fills the model's context of %d tokens (examples %s).",
                self.source,
                len(too_long),
                context,
                ", ".join(map(str, too_long[:10])) + (", ..." if len(too_long) > 10 else ""),
            )
            if not self.passages:
                raise DataError(
                    f"{self.source}: every target is at least {context} tokens long, the model's context; "
                    f"no example can be used."
                )
        self.n_truncated_to_context, self.n_skipped_too_long = n_context, len(too_long)
        if mismatched:
            LOG.warning(
                "%s: %d targets re-tokenise differently from the ids stored at build time (another "
                "tokenizer?); the stored ids are used.",
                self.source,
                mismatched,
            )
        lengths = [len(t) for t in self.target_ids]
        if stored_ids is None and any(n != self.n_tokens for n in lengths):
            LOG.info(
                "%s: target lengths %d..%d tokens with this tokenizer (data.n_tokens=%d).",
                self.source,
                min(lengths),
                max(lengths),
                self.n_tokens,
            )
        self._build_rephrases()
        self._build_locality()
        LOG.info("gen %s split: %d edit examples from %s", self.split, len(self), self.source)

    def _build_rephrases(self) -> None:
        self._cut_cache: Dict[Tuple[int, int], Tuple[str, List[int]]] = {}
        first = [self.rephrase(i, 0) for i in range(len(self))]
        self.rephrases = [text for text, _ in first]  # the cut of draw 0 (what __getitem__ shows)

    def rephrase(self, i: int, draw: int = 0) -> Tuple[str, List[int]]:
        """The equivalence input of edit i in batch ``draw``: the passage with a random prefix of up to half its
        tokens removed, drawn from (seed, i, draw) so every batch cuts anew; the nearest cut at or before the
        drawn one whose text round-trips through the tokenizer. Returns (text, ids)."""
        ids = self.passage_ids[i]
        k0 = int(_rng(self.seed, _SALT_REPHRASE, i, draw).integers(0, len(ids) // 2 + 1))
        key = (i, k0)
        if key not in self._cut_cache:
            p, value = self.passages[i], (self.passages[i], list(ids))
            for k in range(k0, 0, -1):
                cand = _decode(self.tok, ids[k:])
                if p.endswith(cand) and _encode(self.tok, cand) == ids[k:]:
                    value = (cand, list(ids[k:]))
                    break
            self._cut_cache[key] = value
        return self._cut_cache[key]

    def _build_locality(self) -> None:
        self._webtext: Optional[List[str]] = None
        self._webtext_cache: Dict[int, Tuple[str, List[int]]] = {}
        if self.cfg.wiki_webtext:
            self._webtext = webtext_passages(self.split)
        elif len(set(self.documents)) < 2:
            raise DataError(
                f"{self.source}: the {self.split} split needs passages from at least two documents "
                f"(locality passages come from a different document than the edit)."
            )
        self.loc_texts = [self._loc(i, 0)[0] for i in range(len(self))]  # the partners of draw 0

    def locality_ids(self, i: int, r: int = 0, draw: int = 0) -> List[int]:
        """The token ids of the ``r``-th locality passage of edit example ``i`` in batch ``draw``."""
        return self._loc(i, r, draw)[1]

    def _loc(self, i: int, r: int, draw: int = 0) -> Tuple[str, List[int]]:
        """The r-th locality partner of edit example i in batch ``draw``: a passage of the same split from another
        document (or an OpenWebText document with data.wiki_webtext), drawn from (seed, i, r, draw), so every
        batch draws anew."""
        rng = _rng(self.seed, _SALT_LOC, i, r, draw)
        if self._webtext is not None:
            j = int(rng.integers(0, len(self._webtext)))
            if j not in self._webtext_cache:
                ids = _encode(self.tok, self._webtext[j])[: min(self.max_passage_tokens, self.max_length or 1 << 30)]
                self._webtext_cache[j] = (_decode(self.tok, ids), ids)
            return self._webtext_cache[j]
        n = len(self)
        for _ in range(64):
            j = int(rng.integers(0, n))
            if self.documents[j] != self.documents[i]:
                break
        else:
            others = [k for k in range(n) if self.documents[k] != self.documents[i]]
            j = others[int(rng.integers(0, len(others)))]
        return self.passages[j], self.passage_ids[j]

    # ---- access

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, i: int) -> dict:
        return {
            "passage": self.passages[i],
            "target": self.targets[i],
            "rephrase": self.rephrases[i],
            "loc": self.loc_texts[i],
        }

    # ---- batches

    def _pad(self, seqs: List[List[int]], n_prefix: List[int]) -> Dict[str, torch.Tensor]:
        """Right-pad; labels are the ids except on the first n_prefix[r] positions and on padding (IGNORE)."""
        return prompt_target_batch([(s[:k], s[k:]) for s, k in zip(seqs, n_prefix)], self.pad_id)

    def _batch(self, edits: List[int], n_loc: int, epoch: int = 0, draw: int = 0) -> dict:
        inner = self._pad(
            [self.passage_ids[i] + self.target_ids[i] for i in edits], [len(self.passage_ids[i]) for i in edits]
        )
        if self.cfg.rephrase:
            cuts = [self.rephrase(i, draw) for i in edits]
            outer = self._pad(
                [ids + self.target_ids[i] for i, (_, ids) in zip(edits, cuts)], [len(ids) for _, ids in cuts]
            )
            rephrases = [text for text, _ in cuts]
        else:
            outer = {k: v.clone() for k, v in inner.items()}
            rephrases = [self.passages[i] for i in edits]
        # Slot k holds partner k // n_edits of edit k % n_edits: one partner per edit, more when n_loc > n_edits.
        locs = [self._loc(edits[k % len(edits)], k // len(edits), draw) for k in range(n_loc)]
        loc = self._pad([ids for _, ids in locs], [0] * n_loc)
        return {
            "edit_inner": inner,
            "edit_outer": outer,
            "loc": loc,
            "cond": dict(inner),
            "raw": {
                "passage": [self.passages[i] for i in edits],
                "target": [self.targets[i] for i in edits],
                "rephrase": rephrases,
                "loc": [text for text, _ in locs],
            },
        }
