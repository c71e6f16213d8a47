"""The loss functions and the metric aggregation against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from losses import kl_loc_loss, masked_log_probs
from utils import EarlyStopper, StatAverager


def test_kl_loc_loss_is_kl_of_pre_to_post_over_unmasked_tokens():
    pre = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 3.0], [9.0, -9.0, 0.0]]])
    post = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0], [-9.0, 9.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])  # the last position (a huge KL) is padding

    def kl(p_logits, q_logits):  # KL(p || q) of one position, written out
        p = [math.exp(x) for x in p_logits]
        q = [math.exp(x) for x in q_logits]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    terms = [kl(pre[b, t].tolist(), post[b, t].tolist()) for b, t in ((0, 0), (0, 1), (1, 0))]
    want = sum(terms) / 3
    assert kl_loc_loss(pre, post, mask).item() == pytest.approx(want, rel=1e-5)
    # the direction matters: KL(post || pre) is another number
    reverse = sum(kl(post[b, t].tolist(), pre[b, t].tolist()) for b, t in ((0, 0), (0, 1), (1, 0))) / 3
    assert abs(reverse - want) > 1e-3
    # the pre-edit logits are constants: no gradient flows into them
    pre_leaf, post_leaf = pre.clone().requires_grad_(True), post.clone().requires_grad_(True)
    kl_loc_loss(pre_leaf, post_leaf, mask).backward()
    assert pre_leaf.grad is None and post_leaf.grad.abs().sum() > 0
    assert post_leaf.grad[1, 1].abs().sum() == 0  # the masked position gets no gradient


def test_kl_loc_loss_of_a_binary_classifier_is_the_bernoulli_kl():
    pre, post = torch.tensor([[1.5], [-0.5]]), torch.tensor([[0.0], [0.5]])

    def bern(a, b):
        p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    assert kl_loc_loss(pre, post).item() == pytest.approx((bern(1.5, 0.0) + bern(-0.5, 0.5)) / 2, rel=1e-5)


def test_perplexity_is_token_weighted_over_batches():
    avg = StatAverager("_val")
    # batch 1: 2 tokens with nll 1.0 and 3.0; batch 2: 6 tokens with total nll 3.0
    logits1 = torch.log(torch.tensor([[[0.0, math.exp(-1.0), 1.0], [math.exp(-3.0), 0.0, 1.0], [1.0, 1.0, 1.0]]]))
    m1 = masked_log_probs(logits1, torch.tensor([[-100, 1, 0]]), shift=True)
    assert m1["n_tokens"].item() == 2
    for m, n in ((m1, 2), ({"nll_sum": torch.tensor(3.0), "n_tokens": torch.tensor(6)}, 6)):
        avg.add(
            {
                "nll_sum/pre": float(m["nll_sum"]),
                "n_tokens/pre": n,
                "nll_sum/post": float(m["nll_sum"]) + n,
                "n_tokens/post": n,
                "edit/acc": 1.0 if n == 2 else 0.0,
                "time/edit": float(n),
            }
        )
    out = avg.summary()
    nll1 = m1["nll_sum"].item()
    assert out["perplexity/pre_val"] == pytest.approx(math.exp((nll1 + 3.0) / 8), rel=1e-5)
    assert out["perplexity/post_val"] == pytest.approx(math.exp((nll1 + 2 + 3.0 + 6) / 8), rel=1e-5)
    assert out["perplexity/drawdown_val"] == pytest.approx(out["perplexity/post_val"] - out["perplexity/pre_val"])
    assert out["edit/acc_val"] == 0.5  # plain metrics: the mean over batches
    assert out["time/edit_val"] == 4.0  # times: the median


def test_early_stopping_direction_and_patience():
    loss = EarlyStopper(patience=200, key="loss/total_edit_val")
    assert loss.update(100, {"loss/total_edit_val": 3.0})
    assert loss.update(200, {"loss/total_edit_val": 2.0})  # lower is better for a loss
    assert not loss.update(300, {"loss/total_edit_val": 2.5})
    assert not loss.should_stop()  # 100 steps since the best
    assert not loss.update(400, {"loss/total_edit_val": 2.0})  # equal is not better
    assert loss.should_stop() and loss.best_step == 200  # 200 steps without improvement
    acc = EarlyStopper(patience=100, key="edit/acc_val")
    assert acc.update(100, {"edit/acc_val": 0.2})
    assert acc.update(200, {"edit/acc_val": 0.5})  # higher is better for an accuracy
    assert not acc.update(300, {"edit/acc_val": 0.1})
    assert acc.should_stop()
    with pytest.raises(KeyError, match="early_stop_key"):
        acc.update(400, {"loss/edit_val": 1.0})
