"""The fused head's generic path (checkpointed tiles over the plain divergence) equals both
the plain path and the closed-form fast path, and picks up a kind added to divergence.py."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.losses import KINDS, fused_token_divergence, token_divergence
from opd.losses import divergence as divergence_module
from opd.losses import kinds as kinds_module
from opd.losses.fused_chunked import chunked_token_divergence
from opd.losses.fused_kinds import _KINDS

PARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {}}


def make(seed, n=11, v=29, hs=5, ht=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    s = [r(n, hs), r(v, hs, scale=2 / hs**0.5), r(v)]
    t = [r(n, ht), r(v, ht, scale=3 / ht**0.5), r(v)]
    for x in s:
        x.requires_grad_()
    return s, t


def plain(s, t, kind, temperature, **kw):
    ls, lt = s[0] @ s[1].T + s[2], t[0] @ t[1].T + t[2]
    return token_divergence(ls, lt, kind, temperature=temperature, **kw)


def generic(s, t, kind, temperature, chunk=4, **kw):
    return chunked_token_divergence(
        s[0], s[1], t[0], t[1], kind, kd_temperature=temperature, student_head_bias=s[2],
        teacher_head_bias=t[2], token_chunk=chunk, **kw,
    )  # fmt: skip


def closed_form(s, t, kind, temperature, **kw):
    return fused_token_divergence(
        s[0], s[1], t[0], t[1], kind, kd_temperature=temperature, student_head_bias=s[2],
        teacher_head_bias=t[2], token_chunk=3, vocab_chunk=None, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_generic_path_equals_plain_and_closed_form_values_and_gradients(kind):
    s, t = make(0)
    kw = PARAMS.get(kind, {})
    weights = torch.randn(11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for fn in (plain, generic, closed_form):
        value = fn(s, t, kind, 1.4, **kw)
        results.append((value, torch.autograd.grad((value * weights).sum(), s)))
    (want, g_want), *others = results
    for got, g_got in others:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_generic_path_masked_vocabulary_and_gradcheck():
    s, t = make(2, n=3, v=7, hs=3, ht=2)
    with torch.no_grad():
        s[2][[0, 4]] = -math.inf
        t[2][[0, 4]] = -math.inf
    got = generic(s, t, "jsd", 1.0, chunk=2, beta=0.4)
    want = plain(s, t, "jsd", 1.0, beta=0.4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(math.isfinite(x) for x in torch.autograd.grad(got.sum(), s)[1].flatten().tolist())
    s, t = make(3, n=3, v=7, hs=3, ht=2)

    def f(h, w, b):
        return generic([h, w, b], t, "skew_reverse_kl", 0.8, chunk=2, alpha=0.3)

    assert torch.autograd.gradcheck(f, tuple(s), eps=1e-6, atol=1e-7)


@pytest.fixture
def halved_forward_kl(monkeypatch):
    """A kind added the way a contributor would: its name in losses/kinds.py (the torch-free
    list the config validates against) and its formula in divergence.py's
    `divergence_from_logprobs`; nothing in the fused modules knows it."""
    real = divergence_module.divergence_from_logprobs

    def with_new_kind(student, teacher, kind, *, beta=None, alpha=None):
        if kind == "halved_forward_kl":
            return 0.5 * divergence_module._kl_terms(teacher, student)
        return real(student, teacher, kind, beta=beta, alpha=alpha)

    monkeypatch.setattr(kinds_module, "KINDS", (*KINDS, "halved_forward_kl"))
    monkeypatch.setattr(divergence_module, "divergence_from_logprobs", with_new_kind)
    return "halved_forward_kl"


def test_kind_added_to_divergence_module_alone_works_on_the_fused_path(halved_forward_kl):
    assert halved_forward_kl not in _KINDS
    s, t = make(4)
    got = closed_form(s, t, halved_forward_kl, 1.2)  # no closed form: the generic path
    want = plain(s, t, halved_forward_kl, 1.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and it is the new kind, not a known one: half the forward KL
    torch.testing.assert_close(got, 0.5 * plain(s, t, "forward_kl", 1.2))
    for a, b in zip(torch.autograd.grad(got.sum(), s), torch.autograd.grad(want.sum(), s)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_generic_path_holds_one_tile_of_logits_at_a_time():
    n, v, chunk = 24, 200, 4
    s, t = make(5, n=n, v=v, hs=4, ht=4, dtype=torch.float32)
    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] == v:
                    biggest[0] = max(biggest[0], x.numel())
            return out

    with Watch():
        generic(s, t, "tvd", 1.0, chunk=chunk).mean().backward()
    assert biggest[0] <= max(chunk * v, v * 4)  # a tile of logits, or the [V, H] weight grad
