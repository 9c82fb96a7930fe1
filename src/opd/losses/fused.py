"""Fused LM head + divergence: per-token divergence without [tokens, vocab] logits.

With vocabularies of 128k-152k the two models' logits dominate memory: 1024 tokens at
V = 151,936 are 622 MB per model in float32, several times over once softmax and autograd
keep their intermediates. Here the divergence is computed from the final hidden states and
the LM-head weights in tiles of `token_chunk x vocab_chunk` logits, and the gradient flows to
the student's hidden states, head weight and bias. The result equals
`token_divergence(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, kind, temperature=kd_temperature)`.

How it works
------------
* Tiles. Logits are formed `token_chunk x vocab_chunk` at a time (`hidden @ W[v0:v1].T`, one
  matrix product per model) into two reused buffers; the elementwise work then runs on
  column blocks of the tile, which bounds the scratch memory to four blocks.
* Forward. A tile that spans the vocabulary (the default) becomes log-probs in place, one
  row-wise `log_softmax` per model (each row stays in cache through max, sum and
  subtraction; separate passes stream a `[rows, V]` tile from memory several times). Over
  several vocabulary tiles the log-sum-exp is accumulated online (running max and
  rescaled sum, as in flash attention). `forward_kl` / `reverse_kl` accumulate their value in
  the same pass (`sum_v p (z_p - z_q)` rescales like the sum); the mixture kinds and TVD need
  both models' normalizers before any term can be evaluated, so over several vocabulary tiles
  they take a second pass. A tile that spans the vocabulary (`vocab_chunk=None`, the
  default) gives the normalizers, the values and the gradient from one product per model.
* Backward. `dD/dz` for each kind is in closed form (`fused_kinds.py`) from quantities saved by the
  forward (one or two per-token sums; both log-normalizers when rows span several
  vocabulary tiles, else a recomputed tile is normalized again row-wise), so the backward is a single
  pass over the tiles, vocabulary-outer so that each slice of the weight gradient is written
  once: recompute both tiles, form `G = dD/dz`, then `dh += G W`, `dW += G^T h`, `db += G^T 1`.
* Eager gradient. With whole-row tiles and autograd on, the forward already holds every
  row's normalizers and sums, so it forms `G` too and accumulates `dh_unit = G W` (exact for
  any per-token grad_output, which only rescales rows) and `dW_unit = G^T h` for
  grad_output = 1 (Liger-Kernel's idea). The backward then uses
  `dW = c * dW_unit + sum_{i: g_i != c} (g_i - c) G_i h_i^T` with `c` the most frequent value
  of grad_output and recomputes only those rows: none for a plain mean over the tokens passed
  in (pass `hidden[mask]`), the masked rows for a masked mean over padded rows, all rows for
  arbitrary weights. Four matrix products instead of six (eight for JSD/TVD/skew over several
  vocabulary tiles); the price is that each token chunk reads both head weights again, and
  the `[V, Hs]` weight-gradient buffer lives from the forward to the backward.

Kinds without a closed form (any kind added to `divergence.py` alone) take the generic
path of `fused_chunked.py`: checkpointed token tiles over the plain `token_divergence`,
the same values and gradients at the cost of a second forward per tile.

Numerics: tiles are computed in float32 (float64 for float64 inputs); low-precision weights
are upcast one slice at a time. A vocabulary entry masked with a `-inf` bias is clamped to a
huge finite logit, so it adds nothing (the plain path's "0 * log 0 = 0"). No gradient flows
to the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.losses.divergence import DEFAULT_SKEW_ALPHA, _compute_dtype, check_kind
from opd.losses.fused_chunked import DEFAULT_GENERIC_CHUNK, chunked_token_divergence
from opd.losses.fused_kinds import _KINDS, _ONLINE, _PREMULTIPLIED, _fkl, _grad_into, _rowdot
from opd.losses.fused_tiles import (
    OnlineLSE,
    Workspace,
    check_head,
    clamp_masked,
    column_blocks,
    head_grads,
    head_logits,
)

# Tuned with benchmarks/fused_loss.py at N=1024, V=151,936, H=512 (benchmarks/README.md):
# whole-row tiles (the eager gradient); 128 rows keep the two [128, V] float32 logit buffers
# plus the [V, H] weight gradient under the 0.6 GB goal there. On a GPU larger token chunks
# pay (fewer re-reads of the head weights) where memory allows.
DEFAULT_TOKEN_CHUNK = 128
DEFAULT_VOCAB_CHUNK = None  # None: one tile spans the whole vocabulary


@dataclass(frozen=True)
class _Spec:
    kind: str
    param: float
    temperature: float
    token_chunk: int
    vocab_chunk: int
    masked: bool  # a bias holds -inf
    grad_mode: bool  # autograd was on at the call (needs_input_grad ignores no_grad)


class _Inputs:
    """Compute-dtype views: hidden states and biases pre-divided by the temperature."""

    def __init__(self, spec: _Spec, hs, ws, bs, ht, wt, bt):
        dt, T = _compute_dtype(hs), spec.temperature
        self.dt, self.ws, self.wt, self.spec = dt, ws, wt, spec
        self.hs_raw = hs.to(dt)
        scale = (lambda h: h) if T == 1.0 else (lambda h: h / T)  # no copy at temperature 1
        self.hs, self.ht = scale(self.hs_raw), scale(ht.to(dt))
        self.bs = None if bs is None else scale(bs.to(dt))
        self.bt = None if bt is None else scale(bt.to(dt))
        self.N, self.V = hs.shape[0], ws.shape[0]
        self.tc = max(1, min(spec.token_chunk, self.N))
        self.vc = max(1, min(spec.vocab_chunk, self.V))
        self.work = Workspace(dt, hs.device)
        self.fn, self.names, factor, self.c_fn = _KINDS[spec.kind]
        self.factor = factor(spec.param)
        self.premultiplied = spec.kind in _PREMULTIPLIED
        # where `_grad_into` leaves G': the teacher's tile, else the student's
        self.grad_in_t = self.premultiplied or self.fn is _fkl  # forward KL has no A

    def tiles(self, hs, ht, v0: int, v1: int):
        """Both models' logits/T for the given rows x [v0, v1), in buffers 0 and 1."""
        shape = (hs.shape[0], v1 - v0)
        zs = head_logits(self.work.get(0, shape), hs, self.ws, self.bs, v0)
        zt = head_logits(self.work.get(1, shape), ht, self.wt, self.bt, v0)
        if self.spec.masked:
            clamp_masked(zs), clamp_masked(zt)
        return zs, zt

    @property
    def whole_rows(self) -> bool:
        return self.vc >= self.V

    @staticmethod
    def log_probs(zs, zt) -> None:
        """Whole-row tiles to log-probs in place: one row-wise kernel per model, each row
        cache-resident through its max, sum and subtraction (separate max / exp / sum / sub
        passes over a `[rows, V]` tile stream it from memory several times)."""
        torch.log_softmax(zs, 1, out=zs)
        torch.log_softmax(zt, 1, out=zt)

    def blocks(self, zs, zt, Ls=None, Lt=None):
        """(s, t, scratch) per column block; s, t normalized in place when Ls, Lt given."""
        n = zs.shape[0]
        for c0, c1 in column_blocks(n, zs.shape[1]):
            s, t = zs[:, c0:c1], zt[:, c0:c1]
            if Ls is not None:
                s, t = s.sub_(Ls[:, None]), t.sub_(Lt[:, None])
            yield s, t, self.work.scratch(2, (n, c1 - c0))


def _forward(x: _Inputs, eager: tuple[bool, bool, bool] | None):
    """Per-token values, saved sums, normalizers and (eager) unit gradients."""
    spec, N, V, dt, dev = x.spec, x.N, x.V, x.dt, x.hs.device
    values = torch.zeros(N, dtype=dt, device=dev)
    stats = {k: torch.zeros(N, dtype=dt, device=dev) for k in x.names}
    Ls = Lt = None  # normalizers: kept only when a row spans several vocabulary tiles
    if not x.whole_rows:
        Ls, Lt = torch.empty(N, dtype=dt, device=dev), torch.empty(N, dtype=dt, device=dev)
    unit = None
    if eager is not None:  # unit gradients: dh for any grad_output, dW and db for grad_output = 1
        H = x.hs.shape[1]
        # written, not added to, by the first token chunk (`write_dw`): no zero fill unless
        # there is no chunk at all
        new = torch.empty if N else torch.zeros
        unit = (
            new(N, H, dtype=dt, device=dev) if eager[0] else None,
            new(V, H, dtype=dt, device=dev) if eager[1] else None,
            new(V, dtype=dt, device=dev) if eager[2] else None,
        )
    online = _ONLINE.get(spec.kind)
    for r0 in range(0, N, x.tc):
        rows = slice(r0, min(r0 + x.tc, N))
        n = rows.stop - r0
        if x.whole_rows:  # log-probs, sums and the gradient from one matmul per model
            zs, zt = x.tiles(x.hs[rows], x.ht[rows], 0, V)
            x.log_probs(zs, zt)
            blocks = list(x.blocks(zs, zt))
            A_tile = None
            for s, t, w in blocks:
                got, A, _ = x.fn(s, t, w, spec.param, True)
                values[rows] += got["D"]
                for k in x.names:
                    stats[k][rows] += got[k]
                if A is not None and len(blocks) == 1:
                    A_tile = A  # one block: A stays where the kind left it
                elif A is not None:
                    if A is not s:
                        s.copy_(A)  # keep A beside B (in t) until the row sums are complete
                    A_tile = zs
            if unit is not None:
                c = x.c_fn({k: v[rows] for k, v in stats.items()}, spec.param)
                G = _grad_into(zs, A_tile, zt, c, x.premultiplied)
                dh = None if unit[0] is None else unit[0][rows]
                # dh's rows are this chunk's alone; dW and db are first reached by chunk 0
                head_grads(
                    G, 0, x.ws, x.hs_raw[rows], dh, unit[1], unit[2], None,
                    write_dh=True, write_dw=r0 == 0,
                )  # fmt: skip
            continue
        lse_s, lse_t = OnlineLSE(n, x.hs), OnlineLSE(n, x.hs)
        # Several tiles: online normalizers, and the KL value where it is online too.
        acc = torch.zeros(n, dtype=dt, device=dev)
        for v0 in range(0, V, x.vc):
            zs, zt = x.tiles(x.hs[rows], x.ht[rows], v0, min(v0 + x.vc, V))
            for s, t, w in x.blocks(zs, zt):
                p, q = (s, t) if online else (t, s)
                lp, lq = (lse_s, lse_t) if online else (lse_t, lse_s)
                lq.update(q, w(0))
                e, scale = lp.update(p, w(0))
                if online is not None:
                    acc.mul_(scale).add_(_rowdot(e, torch.sub(p, q, out=q), w))
        Ls[rows], Lt[rows] = lse_s.value(), lse_t.value()
        if online is not None:
            lp, lq = (lse_s, lse_t) if online else (lse_t, lse_s)
            values[rows] = acc / lp.Z - lp.value() + lq.value()
            if x.names:  # reverse_kl saves its own value
                stats["D"][rows] = values[rows]
            continue
        for v0 in range(0, V, x.vc):  # second pass: the kind's sums with known normalizers
            zs, zt = x.tiles(x.hs[rows], x.ht[rows], v0, min(v0 + x.vc, V))
            for s, t, w in x.blocks(zs, zt, Ls[rows], Lt[rows]):
                got, _, _ = x.fn(s, t, w, spec.param, True)
                values[rows] += got["D"]
                for k in x.names:
                    stats[k][rows] += got[k]
    return values, stats, Ls, Lt, unit


def _backward_rows(x: _Inputs, sel, omega, stats, Ls, Lt, dw, db, want_dh: bool):
    """Recompute the rows `sel` tile by tile (vocabulary outer, so each slice of dW is
    written once) and accumulate `sum_i omega_i G'_i` into dh (returned, compact), dw, db."""
    hs, ht = x.hs[sel], x.ht[sel]
    if not x.whole_rows:  # whole rows are normalised again row-wise: no saved normalizers
        Ls, Lt = Ls[sel], Lt[sel]
    stats = {k: v[sel] for k, v in stats.items()}
    hw = x.hs_raw[sel] * omega[:, None]
    n = sel.numel()
    dh = torch.zeros(n, hs.shape[1], dtype=x.dt, device=hs.device) if want_dh else None
    for v0 in range(0, x.V, x.vc):
        for r0 in range(0, n, x.tc):
            rows = slice(r0, min(r0 + x.tc, n))
            zs, zt = x.tiles(hs[rows], ht[rows], v0, min(v0 + x.vc, x.V))
            c = x.c_fn({k: v[rows] for k, v in stats.items()}, x.spec.param)
            if x.whole_rows:
                x.log_probs(zs, zt)
            norms = (None, None) if x.whole_rows else (Ls[rows], Lt[rows])
            for s, t, w in x.blocks(zs, zt, *norms):
                _, A, B = x.fn(s, t, w, x.spec.param, False)
                _grad_into(s, A, B, c, x.premultiplied)
            G = zt if x.grad_in_t else zs
            head_grads(G, v0, x.ws, hw[rows], None if dh is None else dh[rows], dw, db, omega[rows])
    return dh


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, spec: _Spec):
        x = _Inputs(spec, hs, ws, bs, ht, wt, bt)
        need = tuple(ctx.needs_input_grad[:3])
        eager = need if spec.grad_mode and any(need) and x.vc >= x.V else None
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
            # the rows at this weight cost nothing more
            c = values[counts.argmax()] if g.numel() else g.new_zeros(())
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
    whole-vocabulary tiles (see the module docstring). That weight-gradient buffer is made
    in the forward and lives until the backward, so call backward per micro-batch (or pass a
    `vocab_chunk` below V, which recomputes in the backward instead) rather than holding
    many calls' graphs at once.
    """
    check_kind(kind, beta=beta, alpha=alpha)
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    if token_chunk < 1 or (vocab_chunk is not None and vocab_chunk < 1):
        raise ValueError(
            f"token_chunk and vocab_chunk must be >= 1, got {token_chunk}, {vocab_chunk}"
        )
    check_head("student", student_hidden, student_head_weight, student_head_bias)
    check_head("teacher", teacher_hidden, teacher_head_weight, teacher_head_bias)
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
    if kind not in _KINDS:
        return chunked_token_divergence(
            student_hidden.reshape(-1, student_hidden.shape[-1]),
            student_head_weight,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_head_weight,
            kind,
            beta=beta,
            alpha=alpha,
            kd_temperature=kd_temperature,
            student_head_bias=student_head_bias,
            teacher_head_bias=teacher_head_bias,
            token_chunk=min(token_chunk, DEFAULT_GENERIC_CHUNK),
        ).reshape(student_hidden.shape[:-1])
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
    spec = _Spec(
        kind, param, float(kd_temperature), token_chunk, vocab_chunk or V, masked,
        torch.is_grad_enabled(),
    )  # fmt: skip
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
