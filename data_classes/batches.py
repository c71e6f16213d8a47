"""Tensors of one batch role from token ids: right padding, and labels on the target tokens only.

Every data set and the editing front end (``edit.py``) build their prompt + target rows here, so that a batch the
editor is trained on and a request it is applied to are laid out the same way.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from losses import IGNORE
from utils import pad_rows


def prompt_target_batch(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """One causal-LM batch role from (prompt ids, target ids) rows: ``input_ids`` = prompt + target, right-padded
    with ``pad_id``; ``labels`` the target tokens, IGNORE on the prompt and the padding."""
    ids, mask = pad_rows([list(p) + list(t) for p, t in rows], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for n, (p, t) in enumerate(rows):
        labels[n, len(p) : len(p) + len(t)] = ids[n, len(p) : len(p) + len(t)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
