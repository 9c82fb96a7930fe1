"""A NaN anywhere in a divergence's inputs gives NaN, never a silent zero: every kind on the
plain, top-k (sparse), fused and fused top-k paths, and the sampled-token estimators.

A NaN value makes the step's loss non-finite, so the loop skips the update and reports it
(`skipped: true`); a NaN turned into 0 would train on a broken teacher without a word.
"""

import math

import pytest
import torch

from opd.losses import (
    KINDS,
    distill_advantages,
    divergence_from_logprobs,
    fused_sparse_token_divergence,
    fused_token_divergence,
    fused_token_logprobs,
    masked_mean,
    policy_gradient_loss,
    reverse_kl_k1,
    reverse_kl_k3,
    sparse_token_divergence,
    token_divergence,
)

PARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {}}
N, V, H, K = 6, 11, 5, 4
BAD = 2  # the row that holds the NaN


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(seed):
    return torch.randn(N, V, generator=_gen(seed), dtype=torch.float64) * 2


def _topk(teacher_logits):
    lp = torch.log_softmax(teacher_logits, -1)
    values, ids = lp.topk(K, dim=-1)
    return ids, values


def _check(out):
    """NaN at the poisoned row, finite elsewhere, and a NaN loss after the masked mean."""
    assert out.shape == (N,)
    assert math.isnan(out[BAD].item()), out
    assert all(math.isfinite(out[i].item()) for i in range(N) if i != BAD), out
    assert math.isnan(masked_mean(out, torch.ones(N, dtype=torch.bool)).item())


# -- where the NaN sits: one entry of one row, teacher side or student side -----------------


def _poison(x, col=3):
    x = x.clone()
    x[BAD, col] = math.nan
    return x


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_logits(kind, side):
    s, t = _logits(1), _logits(2)
    s, t = (s, _poison(t)) if side == "teacher" else (_poison(s), t)
    _check(token_divergence(s, t, kind, **PARAMS.get(kind, {})))


@pytest.mark.parametrize("col", [0, 7])  # a likely entry and an unlikely one
@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("kind", KINDS)
def test_plain_logprobs_one_entry(kind, side, col):
    """One NaN log-prob among finite ones (a cached/remote row can be like that)."""
    s = torch.log_softmax(_logits(1), -1)
    t = torch.log_softmax(_logits(2), -1)
    s, t = (s, _poison(t, col)) if side == "teacher" else (_poison(s, col), t)
    _check(divergence_from_logprobs(s, t, kind, **PARAMS.get(kind, {})))


@pytest.mark.parametrize("where", ["teacher_topk", "student"])
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_topk(kind, where):
    s, t = _logits(1), _logits(2)
    ids, lps = _topk(t)
    if where == "teacher_topk":
        lps = _poison(lps, 1)
    else:
        s = _poison(s)
    _check(sparse_token_divergence(s, ids, lps, kind, **PARAMS.get(kind, {})))


@pytest.mark.parametrize("whole_vocab", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_topk_whole_row_nan(kind, whole_vocab):
    """A teacher row that is NaN throughout (k < V, and k = V with its empty tail)."""
    s, t = _logits(1), _logits(2)
    k = V if whole_vocab else K
    lp = torch.log_softmax(t, -1)
    lps, ids = lp.topk(k, dim=-1)
    lps = lps.clone()
    lps[BAD] = math.nan
    _check(sparse_token_divergence(s, ids, lps, kind, **PARAMS.get(kind, {})))


def _heads(seed):
    g = _gen(seed)
    return (
        torch.randn(N, H, generator=g, dtype=torch.float64),
        torch.randn(V, H, generator=g, dtype=torch.float64),
        torch.randn(V, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize("chunks", [(4, 3), (64, None)])
@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_full_vocab(kind, side, chunks):
    (hs, ws, bs), (ht, wt, bt) = _heads(1), _heads(2)
    if side == "teacher":
        ht = _poison(ht, 1)
    else:
        hs = _poison(hs, 1)
    hs.requires_grad_()
    out = fused_token_divergence(
        hs, ws, ht, wt, kind, student_head_bias=bs, teacher_head_bias=bt,
        token_chunk=chunks[0], vocab_chunk=chunks[1], **PARAMS.get(kind, {}),
    )  # fmt: skip
    _check(out.detach())


@pytest.mark.parametrize("where", ["teacher_topk", "student"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_topk(kind, where):
    hs, ws, bs = _heads(1)
    ids, lps = _topk(_logits(2))
    if where == "teacher_topk":
        lps = _poison(lps, 1)
    else:
        hs = _poison(hs, 1)
    out = fused_sparse_token_divergence(
        hs, ws, ids, lps, kind, student_head_bias=bs, token_chunk=4, vocab_chunk=3,
        **PARAMS.get(kind, {}),
    )  # fmt: skip
    _check(out.detach())


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("estimator", ["k1", "k3", "pg", "fused_pg"])
def test_sampled_token(estimator, side):
    g = _gen(3)
    ids = torch.randint(0, V, (N,), generator=g)
    hs, ws, bs = _heads(1)
    if estimator == "fused_pg":
        if side == "student":
            hs = _poison(hs, 1)
        s = fused_token_logprobs(hs, ws, ids, head_bias=bs, token_chunk=4, vocab_chunk=3)
    else:
        logits = _logits(1) if side == "teacher" else _poison(_logits(1))
        s = torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
    t = torch.log_softmax(_logits(2), -1).gather(-1, ids[:, None])[:, 0]
    if side == "teacher":
        t = t.clone()
        t[BAD] = math.nan
    if estimator == "k1":
        out = reverse_kl_k1(s, t)
    elif estimator == "k3":
        out = reverse_kl_k3(s, t)
    else:
        mask = torch.ones(1, N, dtype=torch.bool)
        adv = distill_advantages(s[None], t[None], mask)
        out = policy_gradient_loss(s[None], adv)[0]
    _check(out.detach())


def test_nan_outside_the_mask_is_ignored():
    """Padding positions may hold anything; only supervised positions count."""
    s, t = _logits(1), _poison(_logits(2))
    out = token_divergence(s, t, "forward_kl")
    mask = torch.ones(N, dtype=torch.bool)
    mask[BAD] = False
    assert math.isfinite(masked_mean(out, mask).item())


def test_equal_inputs_still_give_zero():
    """The NaN guard leaves ordinary values alone (including -inf masked vocabulary)."""
    s = _logits(1)
    s[:, 0] = -math.inf
    for kind in KINDS:
        out = token_divergence(s, s.clone(), kind, **PARAMS.get(kind, {}))
        assert torch.allclose(out, torch.zeros(N, dtype=out.dtype), atol=1e-12), kind
