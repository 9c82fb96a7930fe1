"""Fused LM head + divergence: per-token divergence without [tokens, vocab] logits (issue 9).

With vocabularies of 128k-152k the two models' logits dominate memory: 1024 tokens at
V = 151,936 are 622 MB per model in float32, several times over once softmax and autograd
keep their intermediates. Here the divergence is computed from the final hidden states and
the LM-head weights in tiles of `token_chunk x vocab_chunk` logits, and the gradient flows to
the student's hidden states, head weight and bias. The result equals
`token_divergence(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, kind, temperature=kd_temperature)`.

How it works
------------
* Forward. Each tile of both models' logits is recomputed from `hidden @ W[v0:v1].T`; the
  log-sum-exp over the vocabulary is accumulated online (running max and rescaled sum, as in
  flash attention). `forward_kl` / `reverse_kl` accumulate their value in the same pass
  (`sum_v p(z_p - z_q)` rescales like the sum); the mixture kinds and TVD need both models'
  normalizers before any term can be evaluated, so they take a second pass over the tiles.
  When one tile spans the whole vocabulary (`vocab_chunk >= V`) both passes collapse into one.
* Backward. `dD/dz` for each kind is written in closed form (below) from quantities saved by
  the forward (the two log-normalizers and one or two per-token sums), so the backward needs a
  single pass over the tiles, vocabulary-outer so that each slice of the weight gradient is
  written once: recompute both tiles, form `G = dD/dz`, then `dh += G W`, `dW += G^T h`,
  `db += G^T 1`.
* Eager gradient. When the tile spans the vocabulary and the student needs a gradient, the
  forward already holds every row's normalizers, so it also forms `G` and accumulates
  `dh_unit = G W` (exact for any per-token grad_output, which only rescales rows) and
  `dW_unit = G^T h` for grad_output = 1 (the Liger-Kernel idea). The backward then uses
  `dW = c * dW_unit + sum_{i: g_i != c} (g_i - c) G_i h_i^T` with `c` the most frequent value
  of grad_output, recomputing only those rows: nothing for a plain mean over the tokens
  passed in, the rest of the rows for anything else. This halves the matrix products; the
  price is holding the `[V, H]` weight-gradient buffer from forward to backward.

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

Numerics: tiles are computed in float32 (float64 for float64 inputs); low-precision weights
are upcast one slice at a time. A vocabulary entry masked with a `-inf` bias is clamped to a
huge finite logit, so it adds nothing (the plain path's "0 * log 0 = 0"). No gradient flows
to the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.losses.divergence import DEFAULT_SKEW_ALPHA, _compute_dtype, check_kind

# Tuned with benchmarks/fused_loss.py on a 2-core CPU at N=1024, V=151,936 (see its README):
# one tile spans the vocabulary, which enables the single-pass eager gradient.
DEFAULT_TOKEN_CHUNK = 64
DEFAULT_VOCAB_CHUNK = None  # None: one tile spans the whole vocabulary
_UPCAST_ROWS = 8192  # weight rows upcast at a time when the head is bf16/fp16


# ---------------------------------------------------------------- shared tile helpers


class Workspace:
    """Flat scratch buffers reused across tiles (allocating per tile costs page faults)."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.numel, self.dtype, self.device = numel, dtype, device
        self.shape: tuple[int, int] = (0, 0)
        self._bufs: list[torch.Tensor] = []

    def __call__(self, i: int) -> torch.Tensor:
        while len(self._bufs) <= i:
            self._bufs.append(torch.empty(self.numel, dtype=self.dtype, device=self.device))
        r, c = self.shape
        return self._bufs[i][: r * c].view(r, c)


def head_logits(
    out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, v0: int
) -> torch.Tensor:
    """`out[:, j] = h @ w[v0 + j] + b[v0 + j]` in out's dtype; w may be lower precision."""
    c = out.shape[1]
    step = c if w.dtype == out.dtype else _UPCAST_ROWS
    for a in range(0, c, step):
        e = min(a + step, c)
        wp = w[v0 + a : v0 + e].to(out.dtype)
        o = out[:, a:e]
        if b is None:
            torch.mm(h, wp.t(), out=o)
        else:
            torch.addmm(b[v0 + a : v0 + e], h, wp.t(), out=o)
    return out


def head_grads(
    G: torch.Tensor,
    v0: int,
    w: torch.Tensor,
    hw: torch.Tensor,
    dh: torch.Tensor | None,
    dw: torch.Tensor | None,
    db: torch.Tensor | None,
    row_w: torch.Tensor | None,
) -> None:
    """Accumulate `dh += G @ w[v0:]`, `dw[v0:] += G^T hw`, `db[v0:] += G^T row_w` (or column sums)."""
    c = G.shape[1]
    step = c if w.dtype == G.dtype else _UPCAST_ROWS
    for a in range(0, c, step):
        e = min(a + step, c)
        g = G[:, a:e]
        if dh is not None:
            dh.addmm_(g, w[v0 + a : v0 + e].to(G.dtype))
        if dw is not None:
            dw[v0 + a : v0 + e].addmm_(g.t(), hw)
        if db is not None:
            if row_w is None:
                db[v0 + a : v0 + e] += g.sum(0)
            else:
                db[v0 + a : v0 + e].addmv_(g.t(), row_w)


def clamp_masked(z: torch.Tensor) -> torch.Tensor:
    """Replace -inf logits (masked vocabulary) with a huge finite value: exp gives exactly 0,
    and products with a zero probability stay 0 instead of 0 * inf = NaN."""
    return z.clamp_min_(torch.finfo(z.dtype).min / 64)


class OnlineLSE:
    """Running log-sum-exp over vocabulary tiles: max `M` and `Z = sum exp(z - M)` per row."""

    def __init__(self, n: int, like: torch.Tensor):
        self.M = torch.full((n,), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
        self.Z = torch.zeros(n, dtype=like.dtype, device=like.device)

    def update(self, z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold a tile in; returns (exp(z - M_new) in scratch, rescale factor of old sums)."""
        m_new = torch.maximum(self.M, z.amax(1))
        scale = torch.exp(self.M - m_new)
        e = torch.sub(z, m_new[:, None], out=scratch).exp_()
        self.Z.mul_(scale).add_(e.sum(1))
        self.M = m_new
        return e, scale

    def value(self) -> torch.Tensor:
        return self.M + self.Z.log()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


# ------------------------------------------------ per-kind tile math (s, t normalized)
# Each takes log-prob tiles s, t (overwritten), scratch `w`, the kind's parameter, and either
# stats=None (compute this tile's partial sums) or the full-row sums from the forward. With
# grad=True it also returns G' = (dD/dz) / factor for the tile (stats must then be complete).


def _fkl(s, t, w, _, stats, grad):
    pt = torch.exp(t, out=w(0))
    if stats is None:
        stats = {"D": _rowdot(pt, torch.sub(t, s, out=t))}
    return stats, (s.exp_().sub_(pt) if grad else None)


def _rkl(s, t, w, _, stats, grad):
    ps = torch.exp(s, out=w(0))
    d = torch.sub(s, t, out=t)
    if stats is None:
        stats = {"D": _rowdot(ps, d)}
    return stats, (ps.mul_(d.sub_(stats["D"][:, None])) if grad else None)


def _jsd(s, t, w, beta, stats, grad):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    if stats is None:
        pt = torch.exp(t, out=w(1))
        lm = torch.lerp(ps, pt, beta, out=w(2)).clamp_min_(tiny).log_()
        kt = _rowdot(pt, t.sub_(lm))
        ks = _rowdot(ps, s.sub_(lm))
        stats = {"D": beta * kt + (1.0 - beta) * ks, "KS": ks}
    else:
        s.sub_(torch.lerp(ps, t.exp_(), beta, out=t).clamp_min_(tiny).log_())
    return stats, (ps.mul_(s.sub_(stats["KS"][:, None])) if grad else None)


def _tvd(s, t, w, _, stats, grad):
    ps = torch.exp(s, out=w(0))
    diff = torch.sub(ps, t.exp_(), out=s)
    sign = torch.sign(diff, out=t)
    if stats is None:
        stats = {"D": 0.5 * _rowdot(diff, sign), "K": _rowdot(ps, sign)}
    return stats, (ps.mul_(sign.sub_(stats["K"][:, None])) if grad else None)


def _skew_fkl(s, t, w, a, stats, grad):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    if stats is None:
        pt = torch.exp(t, out=w(1))
        m = torch.lerp(ps, pt, a, out=w(2)).clamp_min_(tiny)
        d = _rowdot(pt, t.sub_(torch.log(m, out=s)))
        q = pt.div_(m)
        stats = {"D": d, "K": _rowdot(ps, q)}
    else:
        pt = t.exp_()
        q = pt.div_(torch.lerp(ps, pt, a, out=s).clamp_min_(tiny))
    return stats, (ps.mul_(q.neg_().add_(stats["K"][:, None])) if grad else None)


def _skew_rkl(s, t, w, a, stats, grad):
    tiny = torch.finfo(s.dtype).tiny
    ps = torch.exp(s, out=w(0))
    pt = t.exp_()
    m = torch.lerp(pt, ps, a, out=w(1)).clamp_min_(tiny)
    q = pt.div_(m)
    s.sub_(m.log_())
    if stats is None:
        stats = {"D": _rowdot(ps, s), "K": _rowdot(ps, q)}
    if not grad:
        return stats, None
    s.add_(q, alpha=1.0 - a).sub_((stats["D"] + (1.0 - a) * stats["K"])[:, None])
    return stats, ps.mul_(s)


_TileFn = Callable[..., tuple[dict, torch.Tensor | None]]
# kind -> (tile function, names of the saved per-token sums, factor(param) of the gradient)
_KINDS: dict[str, tuple[_TileFn, tuple[str, ...], Callable[[float], float]]] = {
    "forward_kl": (_fkl, (), lambda _: 1.0),
    "reverse_kl": (_rkl, ("D",), lambda _: 1.0),
    "jsd": (_jsd, ("KS",), lambda beta: 1.0 - beta),
    "tvd": (_tvd, ("K",), lambda _: 0.5),
    "skew_forward_kl": (_skew_fkl, ("K",), lambda a: 1.0 - a),
    "skew_reverse_kl": (_skew_rkl, ("D", "K"), lambda _: 1.0),
}
_ONLINE = {"forward_kl": False, "reverse_kl": True}  # value online; True: p = student


@dataclass(frozen=True)
class _Spec:
    kind: str
    param: float
    temperature: float
    token_chunk: int
    vocab_chunk: int
    masked: bool  # a bias holds -inf


class _Inputs:
    """Compute-dtype views: hidden states and biases pre-divided by the temperature."""

    def __init__(self, spec: _Spec, hs, ws, bs, ht, wt, bt):
        dt, T = _compute_dtype(hs), spec.temperature
        self.dt, self.ws, self.wt = dt, ws, wt
        self.hs_raw = hs.to(dt)
        self.hs, self.ht = self.hs_raw / T, ht.to(dt) / T
        self.bs = None if bs is None else bs.to(dt) / T
        self.bt = None if bt is None else bt.to(dt) / T
        self.N, self.V = hs.shape[0], ws.shape[0]
        self.tc = max(1, min(spec.token_chunk, self.N))
        self.vc = max(1, min(spec.vocab_chunk, self.V))
        self.work = Workspace(self.tc * self.vc, dt, hs.device)
        self.spec = spec

    def tiles(self, rows: slice, v0: int, v1: int, ht=None, hs=None):
        """Both models' logits/T for rows x [v0, v1), in the first two scratch buffers."""
        self.work.shape = (rows.stop - rows.start, v1 - v0)
        hs = self.hs if hs is None else hs
        ht = self.ht if ht is None else ht
        zs = head_logits(self.work(0), hs[rows], self.ws, self.bs, v0)
        zt = head_logits(self.work(1), ht[rows], self.wt, self.bt, v0)
        if self.spec.masked:
            clamp_masked(zs), clamp_masked(zt)
        return zs, zt

    def scratch(self, i: int) -> torch.Tensor:
        return self.work(i + 2)


def _forward(x: _Inputs, eager: tuple[bool, bool, bool] | None):
    """Per-token values, saved sums, normalizers and (eager) unit gradients."""
    spec, N, V, dt = x.spec, x.N, x.V, x.dt
    fn, names, _ = _KINDS[spec.kind]
    dev = x.hs.device
    values = torch.zeros(N, dtype=dt, device=dev)
    stats = {k: torch.zeros(N, dtype=dt, device=dev) for k in names}
    Ls, Lt = torch.empty(N, dtype=dt, device=dev), torch.empty(N, dtype=dt, device=dev)
    unit = None
    if eager is not None:  # unit gradients: dh for any grad_output, dW and db for grad_output = 1
        H = x.hs.shape[1]
        unit = (
            torch.zeros(N, H, dtype=dt, device=dev) if eager[0] else None,
            torch.zeros(V, H, dtype=dt, device=dev) if eager[1] else None,
            torch.zeros(V, dtype=dt, device=dev) if eager[2] else None,
        )
    for r0 in range(0, N, x.tc):
        rows = slice(r0, min(r0 + x.tc, N))
        n = rows.stop - r0
        lse_s, lse_t = OnlineLSE(n, x.hs), OnlineLSE(n, x.hs)
        online = _ONLINE.get(spec.kind)
        acc = torch.zeros(n, dtype=dt, device=dev)
        for v0 in range(0, V, x.vc):
            zs, zt = x.tiles(rows, v0, min(v0 + x.vc, V))
            if x.vc >= V:  # the tile is whole rows: normalize and evaluate in this pass
                lse_s.update(zs, x.scratch(0))
                lse_t.update(zt, x.scratch(0))
                Ls[rows], Lt[rows] = lse_s.value(), lse_t.value()
                s, t = zs.sub_(Ls[rows, None]), zt.sub_(Lt[rows, None])
                got, G = fn(s, t, x.scratch, spec.param, None, eager is not None)
                values[rows] = got["D"]
                for k in names:
                    stats[k][rows] = got[k]
                if eager is not None:
                    dh = None if unit[0] is None else unit[0][rows]
                    head_grads(G, 0, x.ws, x.hs_raw[rows], dh, unit[1], unit[2], None)
                continue
            # Several tiles: online normalizers, and the KL value where it is online too.
            p, q = (zs, zt) if online else (zt, zs)
            lq = lse_t if online else lse_s
            lp = lse_s if online else lse_t
            lq.update(q, x.scratch(0))
            if online is not None:
                e, scale = lp.update(p, x.scratch(0))
                acc.mul_(scale).add_(_rowdot(e, torch.sub(p, q, out=q)))
            else:
                lp.update(p, x.scratch(0))
        if x.vc >= V:
            continue
        Ls[rows], Lt[rows] = lse_s.value(), lse_t.value()
        if online is not None:
            lp, lq = (lse_s, lse_t) if online else (lse_t, lse_s)
            values[rows] = acc / lp.Z - lp.value() + lq.value()
            if names:  # reverse_kl saves its own value
                stats["D"][rows] = values[rows]
            continue
        for v0 in range(0, V, x.vc):  # second pass: the kind's sums with known normalizers
            zs, zt = x.tiles(rows, v0, min(v0 + x.vc, V))
            s, t = zs.sub_(Ls[rows, None]), zt.sub_(Lt[rows, None])
            got, _ = fn(s, t, x.scratch, spec.param, None, False)
            values[rows] += got["D"]
            for k in names:
                stats[k][rows] += got[k]
    return values, stats, Ls, Lt, unit


def _backward_rows(x: _Inputs, sel, omega, stats, Ls, Lt, dw, db, want_dh: bool):
    """Recompute the rows `sel` tile by tile (vocabulary outer, so each slice of dW is
    written once) and accumulate `sum_i omega_i G'_i` into dh (returned, compact), dw, db."""
    fn, _, _ = _KINDS[x.spec.kind]
    hs, ht, Ls, Lt = x.hs[sel], x.ht[sel], Ls[sel], Lt[sel]
    stats = {k: v[sel] for k, v in stats.items()}
    hw = x.hs_raw[sel] * omega[:, None]
    n = sel.numel()
    dh = torch.zeros(n, hs.shape[1], dtype=x.dt, device=hs.device) if want_dh else None
    for v0 in range(0, x.V, x.vc):
        for r0 in range(0, n, x.tc):
            rows = slice(r0, min(r0 + x.tc, n))
            zs, zt = x.tiles(rows, v0, min(v0 + x.vc, x.V), ht=ht, hs=hs)
            s, t = zs.sub_(Ls[rows, None]), zt.sub_(Lt[rows, None])
            part = {k: v[rows] for k, v in stats.items()}
            _, G = fn(s, t, x.scratch, x.spec.param, part, True)
            head_grads(G, v0, x.ws, hw[rows], None if dh is None else dh[rows], dw, db, omega[rows])
    return dh


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, spec: _Spec):
        x = _Inputs(spec, hs, ws, bs, ht, wt, bt)
        need = tuple(ctx.needs_input_grad[:3])
        eager = need if any(need) and x.vc >= x.V else None
        values, stats, Ls, Lt, unit = _forward(x, eager)
        ctx.spec, ctx.unit, ctx.names = spec, unit, tuple(stats)
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, Ls, Lt, *stats.values())
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt, Ls, Lt, *saved = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        spec = ctx.spec
        x = _Inputs(spec, hs, ws, bs, ht, wt, bt)
        stats = dict(zip(ctx.names, saved))
        scale = _KINDS[spec.kind][2](spec.param) / spec.temperature
        g = grad_out.to(x.dt)
        unit, ctx.unit = ctx.unit, None  # consumed in place: a second backward recomputes
        dh = dw = db = None
        if unit is not None:
            if need_h:
                dh = unit[0].mul_((g * scale)[:, None])
            values, counts = torch.unique(g, return_counts=True)
            c = values[counts.argmax()]  # the rows at this weight cost nothing more
            dw = unit[1].mul_(c * scale) if need_w else None
            db = unit[2].mul_(c * scale) if need_b else None
            row_w = g - c
        else:
            H, V = hs.shape[1], ws.shape[0]
            dw = torch.zeros(V, H, dtype=x.dt, device=hs.device) if need_w else None
            db = torch.zeros(V, dtype=x.dt, device=hs.device) if need_b else None
            row_w = g
        want_dh = need_h and unit is None
        if dw is not None or db is not None or want_dh:
            sel = row_w.nonzero().view(-1)
            dh_sel = None
            if sel.numel():
                omega = row_w[sel] * scale
                dh_sel = _backward_rows(x, sel, omega, stats, Ls, Lt, dw, db, want_dh)
            if want_dh:
                dh = torch.zeros(hs.shape, dtype=x.dt, device=hs.device)
                if dh_sel is not None:
                    dh[sel] = dh_sel * (g[sel] * scale)[:, None]

        def cast(grad, like):
            return None if grad is None else grad.to(like.dtype)

        return cast(dh, hs), cast(dw, ws), cast(db, bs), None, None, None, None


def fused_token_divergence(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    kd_temperature: float = 1.0,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Per-token divergence from hidden states and LM heads, never forming [N, V] logits.

    Shapes: `student_hidden [..., Hs]`, `student_head_weight [V, Hs]`, `teacher_hidden
    [..., Ht]` (same leading dims), `teacher_head_weight [V, Ht]`, biases `[V]`; returns
    `[...]` in float32 (float64 for float64 inputs). Equal to `token_divergence(student_hidden
    @ Ws.T + bs, teacher_hidden @ Wt.T + bt, kind, beta=, alpha=, temperature=kd_temperature)`.
    Gradients flow to the student's hidden states, head weight and bias, in their dtypes;
    the teacher is treated as constant. Reduce with a mask and a token count as usual
    (`masked_mean`); the backward accepts any per-token grad_output.

    Memory: a few `token_chunk x vocab_chunk` tiles (vocab_chunk None: the whole vocabulary)
    plus the `[V, Hs]` weight gradient. Passing only the supervised rows (e.g.
    `hidden[mask]`) and a plain mean makes the backward free once the forward has run with
    whole-vocabulary tiles (see the module docstring).
    """
    check_kind(kind, beta=beta, alpha=alpha)
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    if token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise ValueError(
            f"token_chunk and vocab_chunk must be >= 1, got {token_chunk}, {vocab_chunk}"
        )
    _check_head("student", student_hidden, student_head_weight, student_head_bias)
    _check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias)
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student {student_head_weight.shape[0]} vs teacher "
            f"{teacher_head_weight.shape[0]}; slice both heads to the shared vocabulary first"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
            f"{tuple(teacher_hidden.shape)} must have the same leading (token) dims"
        )
    param = 0.0
    if kind == "jsd":
        param = float(beta)
    elif kind.startswith("skew"):
        param = DEFAULT_SKEW_ALPHA if alpha is None else float(alpha)
        if param == 0.0:  # the mixture is the other distribution: exactly plain KL
            kind = "forward_kl" if kind == "skew_forward_kl" else "reverse_kl"
    biases = (student_head_bias, teacher_head_bias)
    masked = any(b is not None and bool(torch.isneginf(b).any()) for b in biases)
    V = student_head_weight.shape[0]
    spec = _Spec(kind, param, float(kd_temperature), token_chunk, vocab_chunk or V, masked)
    lead = student_hidden.shape[:-1]
    tb = None if teacher_head_bias is None else teacher_head_bias.detach()
    out = _FusedDivergence.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_head_weight,
        student_head_bias,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_head_weight.detach(),
        tb,
        spec,
    )
    return out.reshape(lead)


def _check_head(who: str, hidden, weight, bias) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who} hidden {tuple(hidden.shape)} does not match head weight "
            f"{tuple(weight.shape)} (expected [..., H] and [V, H])"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{who} head bias {tuple(bias.shape)} must be [V={weight.shape[0]}]")
