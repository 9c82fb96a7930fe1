"""Properties of the full-vocabulary divergences against a float64 brute-force reference."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses import KINDS, divergence_from_logprobs, token_divergence

PARAMS = {
    "jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.2},
}


def brute_force(s_logits, t_logits, kind, beta=None, alpha=None, temperature=1.0):
    """Straight from the definitions, one position at a time, in numpy float64."""
    out = []
    for s_row, t_row in zip(
        s_logits.reshape(-1, s_logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1])
    ):
        s = np.exp(s_row / temperature - np.logaddexp.reduce(s_row / temperature))
        t = np.exp(t_row / temperature - np.logaddexp.reduce(t_row / temperature))

        def kl(p, q):
            return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)

        if kind == "forward_kl":
            out.append(kl(t, s))
        elif kind == "reverse_kl":
            out.append(kl(s, t))
        elif kind == "jsd":
            m = beta * t + (1 - beta) * s
            out.append(beta * kl(t, m) + (1 - beta) * kl(s, m))
        elif kind == "tvd":
            out.append(0.5 * np.abs(t - s).sum())
        elif kind == "skew_forward_kl":
            out.append(kl(t, alpha * t + (1 - alpha) * s))
        elif kind == "skew_reverse_kl":
            out.append(kl(s, alpha * s + (1 - alpha) * t))
    return np.array(out).reshape(s_logits.shape[:-1])


logit_arrays = st.integers(2, 9).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-20, 20), min_size=v, max_size=v),
        st.lists(st.floats(-20, 20), min_size=v, max_size=v),
    )
)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(pair=logit_arrays, temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_matches_float64_brute_force(kind, pair, temperature):
    s = np.array(pair[0])
    t = np.array(pair[1])
    got = token_divergence(
        torch.tensor(s), torch.tensor(t), kind, temperature=temperature, **PARAMS.get(kind, {})
    )
    want = brute_force(s, t, kind, temperature=temperature, **PARAMS.get(kind, {}))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None)
@given(pair=logit_arrays)
def test_zero_on_identical_and_nonnegative(kind, pair):
    s = torch.tensor(pair[0], dtype=torch.float64)
    t = torch.tensor(pair[1], dtype=torch.float64)
    params = PARAMS.get(kind, {})
    assert token_divergence(s, s.clone(), kind, **params).abs().item() < 1e-12
    assert token_divergence(s, t, kind, **params).item() >= -1e-12


@settings(max_examples=40, deadline=None)
@given(pair=logit_arrays)
def test_jsd_half_is_symmetric_and_bounded_by_ln2(pair):
    s = torch.tensor(pair[0], dtype=torch.float64)
    t = torch.tensor(pair[1], dtype=torch.float64)
    a = token_divergence(s, t, "jsd", beta=0.5)
    b = token_divergence(t, s, "jsd", beta=0.5)
    assert abs(a.item() - b.item()) < 1e-12
    assert a.item() <= math.log(2) + 1e-12


def test_trl_reference_values():
    """TRL generalized_jsd_loss (trl/trainer/gkd_trainer.py: beta=0 -> F.kl_div(s, t) =
    KL(T||S), beta=1 -> KL(S||T), else mixture log(b*T + (1-b)*S)) evaluated in float64 on an
    asymmetric pair, so a swapped direction or beta changes every figure."""
    s = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    t = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64))
    assert token_divergence(s, t, "forward_kl").item() == pytest.approx(0.583815, abs=1e-6)
    assert token_divergence(s, t, "reverse_kl").item() == pytest.approx(0.537176, abs=1e-6)
    assert token_divergence(s, t, "jsd", beta=0.5).item() == pytest.approx(0.132918, abs=1e-6)
    assert token_divergence(s, t, "jsd", beta=0.1).item() == pytest.approx(0.050995, abs=1e-6)
    assert token_divergence(s, t, "jsd", beta=0.9).item() == pytest.approx(0.047864, abs=1e-6)


@pytest.mark.parametrize("beta,use", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_refused_with_the_kind_to_use(beta, use):
    x = torch.zeros(3)
    with pytest.raises(ValueError, match=use):
        token_divergence(x, x, "jsd", beta=beta)


def test_bad_kind_and_values_are_named():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="allowed: forward_kl"):
        token_divergence(x, x, "kl")
    with pytest.raises(ValueError, match="needs beta"):
        token_divergence(x, x, "jsd")
    with pytest.raises(ValueError, match="kd_temperature"):
        token_divergence(x, x, "forward_kl", temperature=0)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        token_divergence(torch.zeros(3), torch.zeros(4), "forward_kl")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = PARAMS.get(kind, {})
    if kind == "tvd":  # |x| is not differentiable at 0; keep inputs away from ties
        t = (s.detach() + 1.0 + torch.rand(3, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: token_divergence(a, b, kind, temperature=1.5, **params), (s, t)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_large_logits_and_vocab_are_finite_in_float32(kind):
    torch.manual_seed(0)
    V = 150_000
    s = (torch.randn(2, V) * 100).requires_grad_()
    t = torch.randn(2, V) * 100
    out = token_divergence(s, t, kind, **PARAMS.get(kind, {}))
    assert torch.isfinite(out).all() and (out >= -1e-4).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    same = token_divergence(s.detach(), s.detach(), kind, **PARAMS.get(kind, {}))
    assert same.abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_logits_give_no_nan(kind):
    s = torch.tensor(
        [[1.0, 2.0, -math.inf, 0.5], [0.0, -math.inf, -math.inf, 3.0]], requires_grad=True
    )
    t = torch.tensor([[0.3, 1.0, -math.inf, 2.0], [1.0, -math.inf, -math.inf, 0.0]])
    out = token_divergence(s, t, kind, **PARAMS.get(kind, {}))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[:, 2] == 0).all()


def test_logprob_entry_point_equals_logit_entry_point():
    torch.manual_seed(1)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    for kind in KINDS:
        params = PARAMS.get(kind, {})
        a = token_divergence(s, t, kind, **params)
        b = divergence_from_logprobs(s.log_softmax(-1), t.log_softmax(-1), kind, **params)
        torch.testing.assert_close(a, b)
