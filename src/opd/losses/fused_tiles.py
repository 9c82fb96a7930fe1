"""Tile helpers shared by the fused heads (`fused.py`, `fused_sampled.py`).

A fused head forms logits `token_chunk x vocab_chunk` at a time from hidden states and the
LM-head weight, so `[tokens, vocab]` logits never exist. These are the pieces every such
loop needs: logits of a vocabulary slice (upcasting a low-precision weight one slice at a
time), gradient accumulation into the hidden states / weight / bias, an online
log-sum-exp, reusable scratch buffers and column blocks for elementwise work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_UPCAST_ROWS = 8192  # weight rows upcast at a time when the head is bf16/fp16
# Elementwise work runs on column blocks of 4M elements: that bounds the scratch memory
# (four blocks), while each op stays large. Cache-sized blocks cost the same CPU time but
# much more wall time on a loaded CPU: every op is a parallel region that waits for all of
# its threads (benchmarks/README.md, fused loss).
_BLOCK_ELEMS = 1 << 22
_MIN_BLOCK = 128


class Workspace:
    """Scratch buffers reused across tiles (allocating per tile costs page faults)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._bufs: list[torch.Tensor] = []

    def get(self, i: int, shape: tuple[int, int]) -> torch.Tensor:
        numel = shape[0] * shape[1]
        while len(self._bufs) <= i:
            self._bufs.append(torch.empty(0, dtype=self.dtype, device=self.device))
        if self._bufs[i].numel() < numel:
            self._bufs[i] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._bufs[i][:numel].view(shape)

    def scratch(self, first: int, shape: tuple[int, int]) -> Callable[[int], torch.Tensor]:
        return lambda i: self.get(first + i, shape)


def column_blocks(rows: int, cols: int):
    """Column ranges for elementwise work on a `rows x cols` tile."""
    step = max(_MIN_BLOCK, _BLOCK_ELEMS // max(rows, 1))
    return [(c0, min(c0 + step, cols)) for c0 in range(0, cols, step)]


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
    *,
    write_dh: bool = False,
    write_dw: bool = False,
) -> None:
    """Accumulate `dh += G @ w[v0:]`, `dw[v0:] += G^T hw`, `db[v0:] += G^T row_w` (or column sums).

    `write_dh` (G spans the whole vocabulary) writes dh instead, `write_dw` (the first token
    chunk) dw and db: they need not be zero-filled first."""
    c = G.shape[1]
    step = c if w.dtype == G.dtype else _UPCAST_ROWS
    keep_dw = 0.0 if write_dw else 1.0
    for a in range(0, c, step):
        e = min(a + step, c)
        g = G[:, a:e]
        if dh is not None:  # over the slices of one G, dh accumulates after the first
            dh.addmm_(g, w[v0 + a : v0 + e].to(G.dtype), beta=0.0 if write_dh and a == 0 else 1.0)
        if dw is not None:
            dw[v0 + a : v0 + e].addmm_(g.t(), hw, beta=keep_dw)
        if db is not None:
            if row_w is not None:
                db[v0 + a : v0 + e].addmv_(g.t(), row_w, beta=keep_dw)
            elif write_dw:
                torch.sum(g, 0, out=db[v0 + a : v0 + e])
            else:
                db[v0 + a : v0 + e] += g.sum(0)


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


def check_head(who: str, hidden, weight, bias) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who} hidden {tuple(hidden.shape)} does not match head weight "
            f"{tuple(weight.shape)} (expected [..., H] and [V, H])"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{who} head bias {tuple(bias.shape)} must be [V={weight.shape[0]}]")
