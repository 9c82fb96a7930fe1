"""Fused head + divergence against the plain path on materialized logits."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import opd.losses.fused_tiles as tiles_module
from opd.losses import (
    KINDS,
    fused_sparse_token_divergence,
    fused_token_divergence,
    fused_token_logprobs,
    sparse_token_divergence,
    token_divergence,
)

PARAMS = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}, "skew_reverse_kl": {}}
# (token_chunk, vocab_chunk): tiles that divide neither N=13 nor V=37 (two passes, recompute
# backward), whole-vocabulary tiles (eager gradient), and one tile larger than everything.
CHUNKS = [(5, 7), (4, None), (64, 100)]


def make(seed, dtype=torch.float64, n=13, v=37, hs=6, ht=9, bias=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    s = {"h": r(n, hs) / scale, "w": r(v, hs) / hs**0.5, "b": r(v) if bias else None}
    t = {"h": r(n, ht) / scale, "w": r(v, ht) / ht**0.5, "b": r(v) if bias else None}
    for x in (s["h"], s["w"], s["b"]):
        if x is not None:
            x.requires_grad_()
    return s, t


def plain(s, t, kind, temperature=1.0, **kw):
    ls = s["h"] @ s["w"].T + (0 if s["b"] is None else s["b"])
    lt = t["h"] @ t["w"].T + (0 if t["b"] is None else t["b"])
    return token_divergence(ls, lt, kind, temperature=temperature, **kw)


def fused(s, t, kind, temperature=1.0, chunks=(None, None), **kw):
    tc, vc = chunks
    extra = {} if tc is None else {"token_chunk": tc, "vocab_chunk": vc}
    return fused_token_divergence(
        s["h"], s["w"], t["h"], t["w"], kind, kd_temperature=temperature,
        student_head_bias=s["b"], teacher_head_bias=t["b"], **extra, **kw,
    )  # fmt: skip


def student_params(s):
    return [x for x in (s["h"], s["w"], s["b"]) if x is not None]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_values_and_masked_mean_gradients_equal_plain_path(kind, bias, chunks, monkeypatch):
    if chunks != (64, 100):  # elementwise work in column blocks of 3 (and a partial one)
        monkeypatch.setattr(tiles_module, "_BLOCK_ELEMS", 1)
        monkeypatch.setattr(tiles_module, "_MIN_BLOCK", 3)
    s, t = make(1, bias=bias)
    mask = torch.ones(13, dtype=torch.float64)
    mask[[2, 3, 11]] = 0.0
    got = fused(s, t, kind, 0.7, chunks, **PARAMS.get(kind, {}))
    want = plain(s, t, kind, 0.7, **PARAMS.get(kind, {}))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = student_params(s)
    g_got = torch.autograd.grad((got * mask).sum() / mask.sum(), params)
    g_want = torch.autograd.grad((want * mask).sum() / mask.sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunks", [(5, 7), (4, None)])
@pytest.mark.parametrize("kind", KINDS)
def test_float32_gradients_within_1e4_for_any_grad_output(kind, chunks, monkeypatch):
    monkeypatch.setattr(tiles_module, "_MIN_BLOCK", 8)
    monkeypatch.setattr(tiles_module, "_BLOCK_ELEMS", 1)
    # Uniform, mask-like and arbitrary per-token weights exercise the eager gradient alone,
    # with a partial recompute, and with a full recompute; a second backward recomputes all.
    s, t = make(2, dtype=torch.float32)
    got = fused(s, t, kind, 1.3, chunks, **PARAMS.get(kind, {}))
    want = plain(s, t, kind, 1.3, **PARAMS.get(kind, {}))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = [
        torch.full((13,), 1 / 13),
        (torch.arange(13) % 3 != 0).float() / 9,
        torch.randn(13, generator=torch.Generator().manual_seed(0)),
        torch.full((13,), 0.5),
    ]
    params = student_params(s)
    for w in weights:
        g_got = torch.autograd.grad(got, params, w, retain_graph=True)
        g_want = torch.autograd.grad(want, params, w, retain_graph=True)
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("chunks", [(2, 3), (2, None)])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind, chunks):
    s, t = make(3, n=3, v=7, hs=3, ht=2)

    def f(h, w, b):
        return fused_token_divergence(
            h, w, t["h"], t["w"], kind, kd_temperature=0.9, student_head_bias=b,
            teacher_head_bias=t["b"], token_chunk=chunks[0], vocab_chunk=chunks[1],
            **PARAMS.get(kind, {}),
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, (s["h"], s["w"], s["b"]), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "skew_reverse_kl"])
def test_masked_vocabulary_adds_nothing(kind):
    s, t = make(4)
    minus_inf = torch.zeros(37, dtype=torch.float64)
    minus_inf[[0, 5, 36]] = float("-inf")
    with torch.no_grad():
        s["b"] += minus_inf
        t["b"] += minus_inf
    for chunks in [(5, 7), (4, None)]:
        got = fused(s, t, kind, 1.0, chunks, **PARAMS.get(kind, {}))
        want = plain(s, t, kind, 1.0, **PARAMS.get(kind, {}))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        g_got = torch.autograd.grad(got.sum(), student_params(s))
        g_want = torch.autograd.grad(want.sum(), student_params(s))
        for a, b in zip(g_got, g_want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bf16_inputs_accumulate_in_float32_and_return_input_dtypes():
    s, t = make(5, dtype=torch.bfloat16, bias=False)
    s32 = {k: None if v is None else v.detach().float().requires_grad_() for k, v in s.items()}
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    for chunks in [(5, 7), (4, None)]:
        got = fused(s, t, "jsd", 1.0, chunks, beta=0.5)
        assert got.dtype == torch.float32
        want = plain(s32, t32, "jsd", beta=0.5)  # same bf16 numbers, float32 arithmetic
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_got = torch.autograd.grad(got.sum(), [s["h"], s["w"]])
        g_want = torch.autograd.grad(want.sum(), [s32["h"], s32["w"]])
        for a, b in zip(g_got, g_want):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=1e-2 * b.abs().max().item())


def test_leading_dims_teacher_constant_and_skew_alpha_zero():
    s, t = make(6)
    t["h"].requires_grad_()
    h3 = s["h"][:12].reshape(3, 4, 6)
    got = fused_token_divergence(
        h3, s["w"], t["h"][:12].reshape(3, 4, 9), t["w"], "skew_reverse_kl", alpha=0.0
    )
    want = token_divergence(h3 @ s["w"].T, t["h"][:12].reshape(3, 4, 9) @ t["w"].T, "reverse_kl")
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got.sum().backward()
    assert t["h"].grad is None and s["w"].grad is not None


def test_no_tensor_of_tokens_times_vocab_is_allocated():
    n, v = 16, 96
    s, t = make(7, n=n, v=v, hs=4, ht=4)
    biggest = [0]

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            big = [x for x in outs if isinstance(x, torch.Tensor) and x.numel() > 64]
            if big:
                ins = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
                seen = {a.untyped_storage().data_ptr() for a in ins}
                # only new allocations count, not views of an input
                biggest.extend(x.numel() for x in big if x.untyped_storage().data_ptr() not in seen)
            return out

    for chunks, limit in [((8, 24), 8 * 24), ((4, None), 4 * v)]:
        biggest[:] = [0]
        with Watch():
            fused(s, t, "jsd", 1.0, chunks, beta=0.5).mean().backward()
        assert max(biggest) <= max(limit, v * 4), (chunks, max(biggest))
        assert max(biggest) < n * v // 2
    s16, t16 = make(7, n=n, v=v, hs=16, ht=16)
    biggest[:] = [0]
    with Watch(), torch.no_grad():  # no eager gradient buffers ([V, H]) without autograd
        fused(s16, t16, "jsd", 1.0, (4, None), beta=0.5)
    assert max(biggest) < v * 16


def test_rejects_bad_arguments():
    s, t = make(8)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        fused_token_divergence(s["h"], s["w"], t["h"], t["w"][:-1], "forward_kl")
    with pytest.raises(ValueError, match="beta=0"):
        fused_token_divergence(s["h"], s["w"], t["h"], t["w"], "jsd", beta=0.0)
    with pytest.raises(ValueError, match="kd_temperature"):
        fused_token_divergence(s["h"], s["w"], t["h"], t["w"], "tvd", kd_temperature=0.0)
    with pytest.raises(ValueError, match="does not match head weight"):
        fused_token_divergence(s["h"], t["w"], t["h"], t["w"], "tvd")
    with pytest.raises(ValueError, match="leading"):
        fused_token_divergence(s["h"], s["w"], t["h"][:5], t["w"], "tvd")


@pytest.mark.parametrize("chunks", [(4, 6), (64, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_sampled_token_logprobs_equal_log_softmax(bias, chunks):
    s, _ = make(9, bias=bias)
    ids = torch.randint(0, 37, (13,), generator=torch.Generator().manual_seed(1))
    got = fused_token_logprobs(
        s["h"], s["w"], ids, head_bias=s["b"], temperature=0.8,
        token_chunk=chunks[0], vocab_chunk=chunks[1],
    )  # fmt: skip
    logits = s["h"] @ s["w"].T + (0 if s["b"] is None else s["b"])
    want = torch.log_softmax(logits / 0.8, -1).gather(-1, ids[:, None])[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    mask = (torch.arange(13) % 4 != 0).double()
    g_got = torch.autograd.grad((got * mask).sum(), student_params(s))
    g_want = torch.autograd.grad((want * mask).sum(), student_params(s))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_sampled_token_logprobs_gradcheck():
    s, _ = make(12, n=3, v=7, hs=3)
    ids = torch.tensor([0, 6, 3])

    def f(h, w, b):
        return fused_token_logprobs(h, w, ids, head_bias=b, token_chunk=2, vocab_chunk=3)

    assert torch.autograd.gradcheck(f, (s["h"], s["w"], s["b"]))


@pytest.mark.parametrize("k", [2, 37])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_equals_sparse_token_divergence(kind, k):
    s, t = make(10)
    t_logp = torch.log_softmax((t["h"] @ t["w"].T + t["b"]) / 0.9, -1)
    vals, ids = t_logp.topk(k, dim=-1)
    logits = s["h"] @ s["w"].T + s["b"]
    want = sparse_token_divergence(logits, ids, vals, kind, temperature=0.9, **PARAMS.get(kind, {}))
    for tc, vc in [(4, 6), (64, None)]:
        got = fused_sparse_token_divergence(
            s["h"], s["w"], ids, vals, kind, kd_temperature=0.9, student_head_bias=s["b"],
            token_chunk=tc, vocab_chunk=vc, **PARAMS.get(kind, {}),
        )  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad(got.sum(), student_params(s))
        g_want = torch.autograd.grad(want.sum(), student_params(s), retain_graph=True)
        for a, b in zip(g_got, g_want):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_plain_path(kind):
    s, t = make(11, dtype=torch.float32, n=64, v=1000, hs=32, ht=48)
    s = {k: None if v is None else v.detach().cuda().requires_grad_() for k, v in s.items()}
    t = {k: None if v is None else v.cuda() for k, v in t.items()}
    for chunks in [(16, 300), (16, None)]:
        got = fused(s, t, kind, 1.0, chunks, **PARAMS.get(kind, {}))
        want = plain(s, t, kind, 1.0, **PARAMS.get(kind, {}))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        g_got = torch.autograd.grad(got.mean(), student_params(s))
        g_want = torch.autograd.grad(want.mean(), student_params(s))
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_no_tokens():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    for vc in [None, 3]:
        out = fused_token_divergence(
            h, w, torch.zeros(0, 5), torch.randn(10, 5), "jsd", beta=0.5, vocab_chunk=vc
        )
        out.sum().backward()
        assert out.shape == (0,) and w.grad.abs().sum() == 0
    assert fused_token_logprobs(h, w, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_eager_gradient_buffers_are_written_not_read(monkeypatch):
    """The eager path's dh / dW / db buffers start uninitialised (no zero fill): the first
    token chunk must write them. Buffers that start as NaN give the plain path's gradients."""
    s, t = make(11, dtype=torch.float32)
    want = torch.autograd.grad(plain(s, t, "reverse_kl").mean(), [s["h"], s["w"], s["b"]])
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    got = fused(s, t, "reverse_kl", chunks=(4, None))  # 4 token chunks, whole-vocabulary tiles
    grads = torch.autograd.grad(got.mean(), [s["h"], s["w"], s["b"]])
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
