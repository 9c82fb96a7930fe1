"""Sampled-token estimators, the policy-gradient loss, and masked reductions."""

import math

import torch

from opd.losses import (
    distill_advantages,
    masked_mean,
    policy_gradient_loss,
    reverse_kl_k1,
    reverse_kl_k3,
    sequence_mean,
    token_divergence,
)


def test_k1_and_k3_are_unbiased_for_reverse_kl():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(6), torch.randn(6)
    s, t = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    exact = token_divergence(s_logits, t_logits, "reverse_kl").item()
    # Expectation over y ~ p_S, computed exactly by enumerating the vocabulary.
    p = s.exp()
    assert (p * reverse_kl_k1(s, t)).sum().item() == __import__("pytest").approx(exact, rel=1e-5)
    assert (p * reverse_kl_k3(s, t)).sum().item() == __import__("pytest").approx(exact, rel=1e-5)
    assert (reverse_kl_k3(s, t) >= 0).all()


def test_policy_gradient_expected_gradient_is_reverse_kl_gradient():
    """E_{y~p_S}[grad of -(ratio * A)] equals grad KL(S||T), enumerated exactly."""
    torch.manual_seed(0)
    V = 5
    logits = torch.randn(V, requires_grad=True)
    t = torch.randn(V).log_softmax(-1)
    s = logits.log_softmax(-1)
    p = s.detach().exp()
    total = 0.0
    for y in range(V):
        adv = distill_advantages(s[y].view(1, 1), t[y].view(1, 1), torch.ones(1, 1))
        total = total + p[y] * policy_gradient_loss(s[y].view(1, 1), adv).sum()
    (g_pg,) = torch.autograd.grad(total, logits)
    kl = token_divergence(logits, t, "reverse_kl")
    (g_kl,) = torch.autograd.grad(kl, logits)
    torch.testing.assert_close(g_pg, g_kl, rtol=1e-5, atol=1e-6)


def test_importance_ratio_uses_sampler_logprobs():
    s = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    q = torch.tensor([[-1.5, -2.0]])
    adv = torch.tensor([[1.0, -1.0]])
    loss = policy_gradient_loss(s, adv, q)
    torch.testing.assert_close(loss.detach(), torch.tensor([[-math.exp(0.5), 1.0]]))


def test_discounted_advantages_respect_mask():
    s = torch.zeros(1, 4)
    t = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv = distill_advantages(s, t, mask, discount=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]))
    torch.testing.assert_close(distill_advantages(s, t, mask), torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_masked_positions_contribute_nothing_even_if_nan():
    v = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 2.0, 4.0]])
    m = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert masked_mean(v, m).item() == (1 + 3 + 2 + 4) / 4
    torch.testing.assert_close(sequence_mean(v, m), torch.tensor([2.0, 3.0]))


def test_gradient_accumulation_with_global_count_equals_full_batch():
    torch.manual_seed(0)
    w = torch.randn(6, requires_grad=True)
    x = torch.randn(4, 6, 6)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    )
    values = lambda xs: (xs @ w) ** 2  # noqa: E731
    full = masked_mean(values(x), mask)
    (g_full,) = torch.autograd.grad(full, w)
    n = mask.sum()
    halves = masked_mean(values(x[:2]), mask[:2], n) + masked_mean(values(x[2:]), mask[2:], n)
    (g_acc,) = torch.autograd.grad(halves, w)
    torch.testing.assert_close(halves, full)
    torch.testing.assert_close(g_acc, g_full)
    # The naive per-micro-batch mean is *not* the full-batch loss here.
    naive = 0.5 * (masked_mean(values(x[:2]), mask[:2]) + masked_mean(values(x[2:]), mask[2:]))
    assert abs(naive.item() - full.item()) > 1e-3
