"""The text side of the locate-then-edit editors: a request as the originals hold it (a prompt template with ``{}``
where the subject goes), the index of the subject's last token in a tokenised prompt, and right-padded batches.

The originals (kmeng01/rome ``rome/repr_tools.py``, kmeng01/memit) work on strings and tokenise every prompt
themselves; so does this code, with the same rules, so that the same tokens reach the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch


@dataclass
class LocateRequest:
    """One edit as the originals state it: ``prompt`` with ``{}`` for the subject, the subject, and the new target
    with a leading space (the originals add one when it is missing, "for correct tokenization")."""

    prompt: str
    subject: str
    target: str

    @classmethod
    def of(cls, prompt: str, subject: str, target: str) -> LocateRequest:
        at = prompt.find(subject)
        if at < 0:
            raise ValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
        template = _escape(prompt[:at]) + "{}" + _escape(prompt[at + len(subject) :])
        return cls(template, subject, target if target.startswith(" ") else " " + target)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def subject_last_index(tokenizer, template: str, subject: str) -> int:
    """The position of the subject's last token in ``template.format(subject)`` tokenised, computed as the originals
    do (``get_words_idxs_in_templates``, subtoken "last"): the tokens of the text before ``{}`` (its trailing space
    dropped, the space then leading the subject) plus the tokens of the subject, minus one."""
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template holds one '{{}}' for the subject: {template!r}")
    prefix = template[: template.index("{}")]
    word = subject
    if prefix:
        if prefix[-1] != " ":
            raise ValueError(f"the subject must follow a space or start the prompt: {template!r}")
        prefix, word = prefix[:-1], f" {subject.strip()}"
    n_prefix = len(tokenizer(prefix)["input_ids"])
    n_word = len(tokenizer(word)["input_ids"])
    return n_prefix + n_word - 1


def pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def encode_batch(tokenizer, texts: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``texts``, each tokenised as ``tokenizer(text)`` and padded on the right, as
    ``tokenizer(texts, padding=True)`` does with right padding (the originals' GPT-2 and GPT-J tokenizers)."""
    rows: List[List[int]] = [list(tokenizer(t)["input_ids"]) for t in texts]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def target_ids(tokenizer, target: str) -> List[int]:
    """The target's token ids, as the originals take them (a leading BOS or UNK dropped, as AlphaEdit's code does
    for tokenizers that add one; GPT-2's adds none)."""
    ids = list(tokenizer(target)["input_ids"])
    if ids and ids[0] in (tokenizer.bos_token_id, tokenizer.unk_token_id) and ids[0] is not None and len(ids) > 1:
        ids = ids[1:]
    return ids
