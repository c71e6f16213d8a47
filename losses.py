"""Pure loss and metric functions. Each takes logits and labels and returns tensors, a dict of metrics or, for
``sequence_log_probs``, one :class:`SequenceScore` per row.

Conventions:
- ``labels`` use -100 for positions that carry no target (prompt, padding).
- Causal LMs predict token t+1 at position t, so their logits and labels are shifted by one
  (``shift=True``); encoder-decoder models (T5, BART) emit one logit row per label (``shift=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

IGNORE = -100


def _fp32_or_more(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are promoted to float32; float64 stays float64 (gradient checks use it)."""
    return x if x.dtype == torch.float64 else x.float()


def _align(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    if shift:
        logits = logits[:, :-1]  # (B, T-1, V)
        labels = labels[:, 1:]  # (B, T-1)
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up")
    return logits, labels


def _token_log_probs(logits: torch.Tensor, labels: torch.Tensor, shift: bool):
    """Per token: the log-probability of its label (0 where masked), the mask, whether it is the argmax, and the
    argmax itself."""
    logits, labels = _align(logits, labels, shift)
    mask = labels != IGNORE  # (B, T)
    safe_labels = labels.masked_fill(~mask, 0)
    log_probs = torch.log_softmax(_fp32_or_more(logits), dim=-1)
    token_lp = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1) * mask  # (B, T)
    argmax = logits.argmax(-1)
    correct = (argmax == labels) & mask
    return token_lp, mask, correct, argmax


@dataclass(frozen=True)
class SequenceScore:
    """How a model predicts one row's target tokens, teacher-forced."""

    log_prob: float  # log p(target | prompt): the target tokens' log-probabilities summed
    nll: float  # the mean negative log-probability per target token (nan for a row without targets)
    correct: bool  # every target token is the argmax prediction (True for a row without targets)
    accuracy: float  # the fraction of the target tokens that are the argmax prediction (nan without targets)
    argmax: List[int]  # the argmax prediction at each target position


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> List[SequenceScore]:
    """Per row of a batch: the log-probability of its target tokens (the labels that are not IGNORE) and how they
    are predicted. The one scorer of log p(target | prompt): the editing front end, the sequential experiment and the
    field's metrics all read their figures from it."""
    token_lp, mask, correct, argmax = _token_log_probs(logits, labels, shift)
    totals, all_correct = token_lp.sum(-1).tolist(), (correct | ~mask).all(-1).tolist()
    out = []
    for r, (total, every) in enumerate(zip(totals, all_correct)):
        lp, hit, pred = token_lp[r][mask[r]], correct[r][mask[r]], argmax[r][mask[r]]
        out.append(SequenceScore(total, -lp.mean().item(), every, hit.float().mean().item(), pred.tolist()))
    return out


def masked_log_probs(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> dict:
    """Token log-probabilities of the labels under the logits, with sequence and token accuracies.

    Returns a dict of scalars:
      nll       mean negative log-likelihood per target token (token-weighted over the batch)
      log_prob  -nll
      prob      mean per-token probability of the target
      acc       fraction of sequences whose every target token is the argmax prediction
      acc_tok   fraction of target tokens that are the argmax prediction
      nll_sum   summed nll (for token-weighted aggregation, e.g. perplexity)
      n_tokens  number of target tokens
    """
    token_lp, mask, correct, _ = _token_log_probs(logits, labels, shift)
    n_tokens = mask.sum()
    denom = n_tokens.clamp(min=1)
    lp_sum = token_lp.sum()
    has_target = mask.any(-1)
    seq_correct = (correct.sum(-1) == mask.sum(-1)) & has_target
    n_seq = has_target.sum().clamp(min=1)
    return {
        "nll": -lp_sum / denom,
        "log_prob": lp_sum / denom,
        "prob": (token_lp.exp() * mask).sum() / denom,
        "acc": seq_correct.sum().float() / n_seq,
        "acc_tok": correct.sum().float() / denom,
        "nll_sum": -lp_sum,
        "n_tokens": n_tokens,
    }


def binary_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Metrics for a classifier with one logit per example; labels are 0/1."""
    logits = _fp32_or_more(logits.reshape(-1))
    labels = labels.reshape(-1).to(logits.dtype)
    log_p = F.logsigmoid(logits) * labels + F.logsigmoid(-logits) * (1 - labels)
    acc = ((logits > 0).float() == labels).float().mean()
    n = torch.tensor(labels.numel())
    return {
        "nll": -log_p.mean(),
        "log_prob": log_p.mean(),
        "prob": log_p.exp().mean(),
        "acc": acc,
        "acc_tok": acc,
        "nll_sum": -log_p.sum(),
        "n_tokens": n,
    }


def kl_loc_loss(pre_logits: torch.Tensor, post_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_pre || p_post), averaged over unmasked tokens (sequences) or examples (binary classifiers).

    ``pre_logits`` come from the unedited model and are treated as constants.
    A classifier's single logit is a Bernoulli distribution; a sequence model's last dimension is the vocabulary.
    """
    pre_logits = _fp32_or_more(pre_logits.detach())
    post_logits = _fp32_or_more(post_logits)
    if pre_logits.dim() <= 1 or pre_logits.shape[-1] == 1:
        pre, post = pre_logits.reshape(-1), post_logits.reshape(-1)
        pre_p = torch.sigmoid(pre)
        kl = pre_p * (F.logsigmoid(pre) - F.logsigmoid(post)) + (1 - pre_p) * (F.logsigmoid(-pre) - F.logsigmoid(-post))
        return kl.mean()
    pre_lp = torch.log_softmax(pre_logits, dim=-1)
    post_lp = torch.log_softmax(post_logits, dim=-1)
    kl = (pre_lp.exp() * (pre_lp - post_lp)).sum(-1)  # (B, T)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
