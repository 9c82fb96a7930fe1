"""Top-k teacher with a tail bucket."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.losses import KINDS, log_tail_mass, sparse_token_divergence, token_divergence

PARAMS = {"jsd": {"beta": 0.5}}


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([1.0, 0.7]))
def test_k_equals_v_is_the_full_divergence(kind, seed, temperature):
    g = torch.Generator().manual_seed(seed)
    V = 11
    s = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(3, 4, V, generator=g, dtype=torch.float64) * 3
    t_logp = torch.log_softmax(t / temperature, -1)
    vals, ids = t_logp.topk(V, dim=-1)
    sparse = sparse_token_divergence(
        s, ids, vals, kind, temperature=temperature, **PARAMS.get(kind, {})
    )
    full = token_divergence(s, t, kind, temperature=temperature, **PARAMS.get(kind, {}))
    torch.testing.assert_close(sparse, full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_k_equals_v_gradients_are_finite_and_equal(kind):
    torch.manual_seed(0)
    s = torch.randn(5, 9, requires_grad=True)
    t = torch.randn(5, 9)
    vals, ids = t.log_softmax(-1).topk(9, dim=-1)
    sparse_token_divergence(s, ids, vals, kind, **PARAMS.get(kind, {})).sum().backward()
    g_sparse = s.grad.clone()
    s.grad = None
    token_divergence(s, t, kind, **PARAMS.get(kind, {})).sum().backward()
    torch.testing.assert_close(g_sparse, s.grad, rtol=1e-4, atol=1e-6)


def test_tail_bucket_by_hand():
    # teacher [.5, .3, .2], k=1 keeps .5; tail .5. Student [.2, .4, .4] folds to [.2, .8].
    s = torch.log(torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64))
    ids = torch.tensor([0])
    vals = torch.log(torch.tensor([0.5], dtype=torch.float64))
    got = sparse_token_divergence(s, ids, vals, "forward_kl")
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_log_tail_mass_exact_and_empty():
    vals = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]], dtype=torch.float64))
    tail = log_tail_mass(vals)
    assert tail[0].item() == pytest.approx(math.log(0.25))
    assert tail[1].item() == -math.inf


def test_sparse_gradcheck_float64():
    torch.manual_seed(0)
    s = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    vals, ids = torch.randn(4, 8, dtype=torch.float64).log_softmax(-1).topk(3, dim=-1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):

        def fn(x, kind=kind):
            return sparse_token_divergence(x, ids, vals, kind, **PARAMS.get(kind, {}))

        assert torch.autograd.gradcheck(fn, (s,))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="same shape"):
        sparse_token_divergence(
            torch.zeros(5), torch.zeros(2, dtype=torch.long), torch.zeros(3), "forward_kl"
        )
