"""Closed-form gradients of each divergence for the fused head (`fused.py`'s fast path).

Gradients w.r.t. the student's normalized-logit variable `z` (temperature already applied),
with `s, t` the log-probs, `p_s, p_t` the probabilities, every sum over the vocabulary:
  forward_kl    p_s - p_t
  reverse_kl    p_s (s - t - KL(S||T))
  jsd(beta)     (1-beta) p_s (s - log m - KL(S||M)),        m = beta p_t + (1-beta) p_s
  tvd           1/2 p_s (sign(p_s - p_t) - sum p_s sign(p_s - p_t))
  skew_fkl(a)   (1-a) p_s (K - q),   q = p_t/m, K = sum p_s q, m = a p_t + (1-a) p_s
  skew_rkl(a)   p_s (s - log m - D + (1-a)(q - K)),           m = a p_s + (1-a) p_t
Each follows from `dD/dz = g - p_s sum(g)` with `g = dD/ds`; the tests check them against
autograd through `token_divergence` and with `torch.autograd.gradcheck`.

A kind without an entry here still works on the fused path: `fused.py` falls back to
`fused_chunked.py` (checkpointed tiles over the plain `token_divergence`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _rowdot(a: torch.Tensor, b: torch.Tensor, w) -> torch.Tensor:
    return torch.mul(a, b, out=w(3)).sum(1)


# ------------------------------------------------ per-kind block math (s, t normalized)
# Each takes log-prob blocks s, t (views, overwritten), scratch `w(i)`, the kind's parameter
# and whether to return this block's partial sums. It returns (sums, A, B) with B left in
# t's storage and A in w(0) or s (or None), such that G' = A * (B - c(stats)) (or B - c) where
# G' = (dD/dz) / factor and c is the kind's per-row constant from the full-row sums. Kinds in
# `_PREMULTIPLIED` return B already multiplied by A (c is the row sum of that product, so it
# is formed once): G' = B - A * c, one pass instead of two.


def _fkl(s, t, w, _, want_sums):
    pt = torch.exp(t, out=w(0))
    sums = {"D": _rowdot(pt, torch.sub(t, s, out=t), w)} if want_sums else None
    return sums, None, torch.sub(s.exp_(), pt, out=t)


def _rkl(s, t, w, _, want_sums):
    d = torch.sub(s, t, out=t)
    ps = s.exp_()  # s is spent once d exists: p_s takes its storage (no scratch touched)
    pd = d.mul_(ps)  # premultiplied: G' = p_s d - p_s KL
    return ({"D": pd.sum(1)} if want_sums else None), ps, pd


def _jsd(s, t, w, beta, want_sums):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    sums = None
    if want_sums:
        pt = torch.exp(t, out=w(1))
        lm = torch.lerp(ps, pt, beta, out=w(2)).clamp_min_(tiny).log_()
        kt = _rowdot(pt, t.sub_(lm), w)
        pb = torch.sub(s, lm, out=t).mul_(ps)  # premultiplied: G' = p_s b - p_s KS
        ks = pb.sum(1)
        sums = {"D": beta * kt + (1.0 - beta) * ks, "KS": ks}
    else:
        lm = torch.lerp(ps, t.exp_(), beta, out=t).clamp_min_(tiny).log_()
        pb = torch.sub(s, lm, out=t).mul_(ps)
    return sums, ps, pb


def _tvd(s, t, w, _, want_sums):
    ps = torch.exp(s, out=w(0))
    diff = torch.sub(ps, t.exp_(), out=s)
    sign = torch.sign(diff, out=t)
    sums = {"D": 0.5 * _rowdot(diff, sign, w), "K": _rowdot(ps, sign, w)} if want_sums else None
    return sums, ps, sign


def _skew_fkl(s, t, w, a, want_sums):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    sums = None
    if want_sums:
        pt = torch.exp(t, out=w(1))
        m = torch.lerp(ps, pt, a, out=w(2)).clamp_min_(tiny)
        d = _rowdot(pt, t.sub_(torch.log(m, out=s)), w)
        q = pt.div_(m)
        sums = {"D": d, "K": _rowdot(ps, q, w)}
        return sums, ps, torch.neg(q, out=t)
    pt = t.exp_()
    q = pt.div_(torch.lerp(ps, pt, a, out=s).clamp_min_(tiny))
    return sums, ps, q.neg_()


def _skew_rkl(s, t, w, a, want_sums):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    pt = t.exp_()
    m = torch.lerp(pt, ps, a, out=w(1)).clamp_min_(tiny)
    q = pt.div_(m)
    s.sub_(m.log_())
    sums = {"D": _rowdot(ps, s, w), "K": _rowdot(ps, q, w)} if want_sums else None
    return sums, ps, q.mul_(1.0 - a).add_(s)


_TileFn = Callable[..., tuple]
# kind -> (block function, saved per-token sums, gradient factor(param), c(stats, param))
_KINDS: dict[str, tuple[_TileFn, tuple[str, ...], Callable, Callable]] = {
    "forward_kl": (_fkl, (), lambda _: 1.0, lambda st, _: None),
    "reverse_kl": (_rkl, ("D",), lambda _: 1.0, lambda st, _: st["D"]),
    "jsd": (_jsd, ("KS",), lambda beta: 1.0 - beta, lambda st, _: st["KS"]),
    "tvd": (_tvd, ("K",), lambda _: 0.5, lambda st, _: st["K"]),
    "skew_forward_kl": (_skew_fkl, ("K",), lambda a: 1.0 - a, lambda st, _: -st["K"]),
    "skew_reverse_kl": (
        _skew_rkl,
        ("D", "K"),
        lambda _: 1.0,
        lambda st, a: st["D"] + (1.0 - a) * st["K"],
    ),
}
_ONLINE = {"forward_kl": False, "reverse_kl": True}  # value online; True: p = student
_PREMULTIPLIED = frozenset({"reverse_kl", "jsd"})


def _grad_into(out: torch.Tensor, A, B: torch.Tensor, c, premultiplied: bool) -> torch.Tensor:
    """The block's G': A * (B - c) into `out`; in B's storage (t's) instead when there is no
    A (B - c) or B is premultiplied (B - A * c). `_Inputs.grad_in_t` says which."""
    if premultiplied:
        return B.addcmul_(A, c[:, None], value=-1.0)
    if c is not None:
        B = B.sub_(c[:, None])
    return B if A is None else torch.mul(A, B, out=out)
