"""Top-k + tail at the extremes, float32 against float64 brute force.

A confident teacher (one logit far above the rest) has top-k log-probs that round to a sum
of exactly 1 in float32: its tail must still be the true, positive one (carried from its
logits), not an empty bucket that makes reverse KL infinite. The student's tail must be
precise both where it is tiny and where it holds nearly all the mass; rows a mask drops
may hold -inf teacher log-probs and must add a zero gradient, never NaN.
"""

import math

import pytest
import torch

from opd.losses import fused_sparse_token_divergence, masked_sum, sparse_token_divergence
from opd.losses.sparse import fold_student_to_buckets, log_tail_mass
from opd.teachers.base import _token_and_topk, _token_logprobs_consuming

V, K = 1000, 4


def _buckets64(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float64 brute force: log-probs at `ids` and the log-sum-exp of all the others."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    rest = lp.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)
    return torch.cat([lp.gather(-1, ids), rest], dim=-1)


def _reverse_kl64(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor):
    s, t = _buckets64(student, ids), _buckets64(teacher, ids)
    return (s.exp() * (s - t)).sum(-1)


def _confident_teacher():
    """Two rows, V = 1000: one logit at +25 (+22.8) and the rest at 0. The tail is ~1e-8 to
    1e-7, below float32's resolution next to the top-1 (its log-prob reads 0.0)."""
    t = torch.zeros(2, V)
    t[0, 3], t[1, 7] = 25.0, 22.8
    s = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    return t, s


def test_confident_teacher_top1_rounds_to_zero_but_the_tail_stays_exact():
    t, _ = _confident_teacher()
    ids0 = torch.zeros(2, dtype=torch.long)
    _, ids, lp, tail = _token_and_topk(t, ids0, "topk", K, 1.0)
    assert float(lp[0, 0]) == 0.0  # the float32 top-1 log-prob: no tail left in 1 - sum
    want = _buckets64(t, ids)[:, -1]
    assert want.max() < -15.0
    torch.testing.assert_close(tail.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_confident_teacher_reverse_kl_matches_float64(fused):
    t, s = _confident_teacher()
    _, ids, lp, tail = _token_and_topk(t, torch.zeros(2, dtype=torch.long), "topk", K, 1.0)
    want = _reverse_kl64(s, t, ids)
    assert want.min() > 15.0  # the row costs ~16-18 nats, not inf
    if fused:  # logits = hidden @ I: the fused head sees the same student logits
        x = s.clone().requires_grad_()
        eye = torch.eye(V)
        got = fused_sparse_token_divergence(
            x, eye, ids, lp, "reverse_kl", teacher_tail_logmass=tail, vocab_chunk=300
        )
    else:
        x = s.clone().requires_grad_()
        got = sparse_token_divergence(x, ids, lp, "reverse_kl", teacher_tail_logmass=tail)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), x)
    x64 = s.double().requires_grad_()
    (want_grad,) = torch.autograd.grad(_reverse_kl64(x64, t, ids).sum(), x64)
    assert bool(torch.isfinite(grad).all())
    assert float((grad.double() - want_grad).norm() / want_grad.norm()) < 1e-5


def test_tail_inferred_from_rounded_logprobs_is_floored_not_empty():
    """Without a reported tail (a remote teacher's top-k only), a top-k that rounds to a sum
    of 1 below the vocabulary reads float32's resolution, so the loss stays finite."""
    t, s = _confident_teacher()
    _, ids, lp, _ = _token_and_topk(t, torch.zeros(2, dtype=torch.long), "topk", K, 1.0)
    tail = log_tail_mass(lp, V)
    assert float(tail[0]) == pytest.approx(math.log(torch.finfo(torch.float32).eps))
    assert log_tail_mass(lp)[0] == -math.inf  # vocabulary unknown: empty, as before
    x = s.clone().requires_grad_()
    value = sparse_token_divergence(x, ids, lp, "reverse_kl")
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert all(math.isfinite(v) for v in value.tolist())
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("shift", [-12.0, -6.0, 0.0, 8.0])
def test_student_tail_precise_when_near_one_and_when_small(kind, shift):
    """`shift` moves the student's logits at the teacher's top-k: -12 leaves it a tail of
    1 - 1e-7 (where log(1 - sum) is the precise form), +8 a tail of ~1e-3 (where the
    log-sum-exp of the rest is). Inputs are float32-representable, so the float32 result
    may differ from float64 only by float32 arithmetic."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(32, V, generator=g, dtype=torch.float64)
    t = torch.randn(32, V, generator=g, dtype=torch.float64) * 3.0
    lp_t, ids = torch.log_softmax(t, -1).topk(K, dim=-1)
    lp_t = lp_t.float().double()
    s = s.scatter(-1, ids, s.gather(-1, ids) + shift).float().double()
    beta = 0.5 if kind == "jsd" else None
    out = {}
    for dt in (torch.float64, torch.float32):
        x = s.to(dt).requires_grad_()
        value = sparse_token_divergence(x, ids, lp_t.to(dt), kind, beta=beta)
        (grad,) = torch.autograd.grad(value.sum(), x)
        out[dt] = value.detach().double(), grad.double()
    (v64, g64), (v32, g32) = out[torch.float64], out[torch.float32]
    torch.testing.assert_close(v32, v64, rtol=2e-6, atol=1e-9)
    assert float((g32 - g64).norm() / g64.norm()) < 5e-6
    buckets = fold_student_to_buckets(s.float(), ids)[..., -1].double()
    torch.testing.assert_close(buckets, _buckets64(s, ids)[..., -1], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "skew_reverse_kl"])
def test_masked_rows_with_minus_inf_teacher_add_zero_gradient(kind):
    """A caller's padding rows may hold -inf teacher log-probs; masked out, they must add
    nothing to the value and a zero (not NaN) gradient."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 50, generator=g)
    lp, ids = torch.log_softmax(torch.randn(3, 50, generator=g) * 2, -1).topk(K, dim=-1)
    lp[2] = -math.inf  # the padding row
    mask = torch.tensor([True, True, False])
    beta = 0.5 if kind == "jsd" else None
    x = s.clone().requires_grad_()
    value = sparse_token_divergence(x, ids, lp, kind, beta=beta)
    total = masked_sum(value, mask)
    (grad,) = torch.autograd.grad(total, x)
    assert bool(torch.isfinite(grad).all())
    assert float(grad[2].abs().max()) == 0.0
    x2 = s[:2].clone().requires_grad_()
    alone = sparse_token_divergence(x2, ids[:2], lp[:2], kind, beta=beta).sum()
    (grad2,) = torch.autograd.grad(alone, x2)
    torch.testing.assert_close(total, alone)
    torch.testing.assert_close(grad[:2], grad2)


def test_token_logprob_scored_in_place_equals_float64_at_the_extremes():
    """The teacher's sampled-token log-prob from hidden states exponentiates its logits chunk
    in place (one [rows, V] tensor, not two); it must equal float64's log-softmax where the
    token is the confident top-1, a token 25 nats below it, and beside masked -inf columns."""
    t, _ = _confident_teacher()
    t[:, 900:] = -math.inf  # a padded vocabulary's masked columns
    ids = torch.tensor([3, 5])  # row 0: the confident top-1; row 1: far below its top-1
    want = torch.log_softmax(t.double(), dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    got = _token_logprobs_consuming(t.clone(), ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    z = t.clone()
    kept, *_ = _token_and_topk(z, ids, "token", 0, 1.0)  # not consuming: logits untouched
    assert torch.equal(z, t) and torch.equal(kept, got)
