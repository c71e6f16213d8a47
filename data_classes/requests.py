"""Edit requests: what a user asks an editor to change, read from Python or from a JSONL file.

An :class:`EditRequest` asks the model to continue ``prompt`` with ``target``; its ``rephrases`` are other phrasings on
which the edit should hold too and its ``watch`` prompts unrelated ones whose behaviour should not change (both are
checked, not trained on). Its optional ``subject`` names the part of the prompt the fact is about (what ROME-style
editors locate; it must occur in the prompt). A request file has one JSON object per line,
``{"prompt": "...", "target": "...", "rephrases": ["..."], "watch": ["..."], "subject": "..."}``; a malformed one
raises :class:`errors.EditRequestError` naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from errors import EditRequestError

from .base import read_jsonl

REQUEST_KEYS = ("prompt", "target", "rephrases", "watch", "subject")


@dataclass
class EditRequest:
    """Make the model continue ``prompt`` with ``target``.

    ``rephrases``: other phrasings of the prompt on which the edit should hold too (checked, not trained on).
    ``watch``: unrelated prompts whose behaviour should not change (checked).
    ``subject``: the part of the prompt the fact is about (e.g. "Paris" in "Paris is the capital of"), for editors
    that locate it; None when not given.
    """

    prompt: str
    target: str
    rephrases: List[str] = field(default_factory=list)
    watch: List[str] = field(default_factory=list)
    subject: Optional[str] = None

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "") -> None:
        at = f"{where}: " if where else ""
        for key in ("prompt", "target"):
            value = getattr(self, key)
            if not isinstance(value, str):
                raise EditRequestError(f"{at}'{key}' must be a string, got {type(value).__name__} ({value!r}).")
            if not value.strip():
                raise EditRequestError(f"{at}'{key}' is empty.")
        for key in ("rephrases", "watch"):
            value = getattr(self, key)
            if isinstance(value, str):
                raise EditRequestError(f"{at}'{key}' must be a list of strings, e.g. [{value!r}], not a string.")
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in value):
                raise EditRequestError(f"{at}'{key}' must be a list of non-empty strings, got {value!r}.")
            setattr(self, key, list(value))
        if self.subject is not None:
            if not isinstance(self.subject, str) or not self.subject.strip():
                raise EditRequestError(f"{at}'subject' must be a non-empty string, got {self.subject!r}.")
            if self.subject not in self.prompt:
                raise EditRequestError(f"{at}'subject' {self.subject!r} does not occur in the prompt {self.prompt!r}.")

    @classmethod
    def from_dict(cls, obj, where: str = "") -> EditRequest:
        at = f"{where}: " if where else ""
        if not isinstance(obj, dict):
            raise EditRequestError(f"{at}expected a JSON object with 'prompt' and 'target', got {type(obj).__name__}.")
        missing = [k for k in ("prompt", "target") if k not in obj]
        if missing:
            raise EditRequestError(f"{at}missing {' and '.join(repr(k) for k in missing)} (keys: {list(obj)}).")
        unknown = [k for k in obj if k not in REQUEST_KEYS]
        if unknown:
            raise EditRequestError(f"{at}unknown key(s) {unknown}; a request has the keys {list(REQUEST_KEYS)}.")
        try:
            return cls(obj["prompt"], obj["target"], obj.get("rephrases", []), obj.get("watch", []), obj.get("subject"))
        except EditRequestError as e:
            raise EditRequestError(f"{at}{e}") from None


def load_requests(path: str) -> List[EditRequest]:
    """Read a JSONL file of requests (blank lines skipped); a malformed line raises naming file and line."""
    requests = [EditRequest.from_dict(obj, where) for _, where, obj in read_jsonl(path, EditRequestError)]
    if not requests:
        raise EditRequestError(f"{path}: holds no requests (one JSON object per line).")
    return requests


@dataclass
class EditTokens:
    """A request as token ids: the prompt, the target (with its leading space), the rephrasings, the watched prompts."""

    prompt: List[int]
    target: List[int]
    rephrases: List[List[int]] = field(default_factory=list)
    watch: List[List[int]] = field(default_factory=list)
