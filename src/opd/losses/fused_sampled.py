"""Fused LM head for the sampled-token and top-k estimators.

Both need only a few numbers per position from the student's head: the logits of given token
ids, the log-normalizer `log Z`, and (top-k) the log-sum-exp of the logits *outside* those
ids, the student's tail bucket. `_HeadGather` computes them in `token_chunk x vocab_chunk`
tiles with an online log-sum-exp and recomputes the tiles in the backward, so the student's
`[N, V]` logits never exist. The divergence over the k+1 buckets then runs through the plain
`divergence_from_logprobs` on `[N, k+1]` tensors, so it equals `sparse_token_divergence` by
construction.

Gradient of the three outputs w.r.t. the logits `z` (temperature applied), per row:
`d log Z = softmax(z)`, `d log Z_out = softmax(z with the ids masked out)`,
`d z_id = onehot(id)`.

The tile helpers shared with `fused.py` live in `fused_tiles.py`.
"""

from __future__ import annotations

import math

import torch

from opd.losses.divergence import _compute_dtype, check_kind, divergence_from_logprobs
from opd.losses.fused_tiles import (
    OnlineLSE,
    Workspace,
    check_head,
    clamp_masked,
    head_grads,
    head_logits,
)
from opd.losses.sparse import bucket_tail, padded_ids, teacher_buckets, without_padding

# One student head only, no eager gradient: wide tiles, vocabulary-outer backward.
DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 16384


def _mask_ids(z: torch.Tensor, idx: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Set `z[row, idx]` to -inf where `inside`; positions of outside ids are untouched
    (amin against +inf), also when a clamped outside id shares a column with an inside one."""
    src = torch.full(idx.shape, math.inf, dtype=z.dtype, device=z.device)
    src.masked_fill_(inside, -math.inf)
    return z.scatter_reduce_(1, idx, src, reduce="amin", include_self=True)


class _HeadGather(torch.autograd.Function):
    """(h, W, b, ids) -> (z[ids] [N, k], log Z [N], log Z_outside_ids [N]), z = (h W^T + b)/T."""

    @staticmethod
    def forward(ctx, h, w, b, ids, temperature, token_chunk, vocab_chunk, with_tail):
        dt = _compute_dtype(h)
        hT = h.to(dt) / temperature
        bT = None if b is None else b.to(dt) / temperature
        N, V, k = h.shape[0], w.shape[0], ids.shape[1]
        tc, vc = max(1, min(token_chunk, N)), max(1, min(vocab_chunk, V))
        masked = b is not None and bool(torch.isneginf(b).any())
        work = Workspace(dt, h.device)
        picked = torch.zeros(N, k, dtype=dt, device=h.device)
        log_z = torch.empty(N, dtype=dt, device=h.device)
        log_out = torch.full((N,), -math.inf, dtype=dt, device=h.device)
        for r0 in range(0, N, tc):
            rows = slice(r0, min(r0 + tc, N))
            full, out = OnlineLSE(rows.stop - r0, hT), OnlineLSE(rows.stop - r0, hT)
            for v0 in range(0, V, vc):
                shape = (rows.stop - r0, min(vc, V - v0))
                z = head_logits(work.get(0, shape), hT[rows], w, bT, v0)
                if masked:
                    clamp_masked(z)
                local = ids[rows] - v0
                inside = (local >= 0) & (local < z.shape[1])
                idx = local.clamp(0, z.shape[1] - 1)
                picked[rows] = torch.where(inside, z.gather(1, idx), picked[rows])
                full.update(z, work.get(1, shape))
                if with_tail:
                    out.update(_mask_ids(z, idx, inside), work.get(1, shape))
            log_z[rows] = full.value()
            if with_tail:  # Z == 0 (every id is in the top-k): an empty tail, log 0 = -inf
                log_out[rows] = torch.where(out.Z > 0, out.value(), log_out[rows])
        ctx.save_for_backward(h, w, b, ids, log_z, log_out)
        ctx.cfg = (temperature, tc, vc, with_tail, masked)
        return picked, log_z, log_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_picked, g_log_z, g_log_out):
        h, w, b, ids, log_z, log_out = ctx.saved_tensors
        T, tc, vc, with_tail, masked = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dt = log_z.dtype
        N, V = h.shape[0], w.shape[0]
        zeros = torch.zeros(N, dtype=dt, device=h.device)
        g_picked = (
            torch.zeros(ids.shape, dtype=dt, device=h.device)
            if g_picked is None
            else g_picked.to(dt)
        )
        g_log_z = zeros if g_log_z is None else g_log_z.to(dt)
        g_log_out = zeros if g_log_out is None or not with_tail else g_log_out.to(dt)
        dh = torch.zeros(N, h.shape[1], dtype=dt, device=h.device) if need_h else None
        dw = torch.zeros(w.shape, dtype=dt, device=h.device) if need_w else None
        db = torch.zeros(V, dtype=dt, device=h.device) if need_b else None
        # Rows whose three output gradients are all zero (masked tokens) contribute nothing.
        sel = ((g_log_z != 0) | (g_log_out != 0) | (g_picked != 0).any(1)).nonzero().view(-1)
        if sel.numel():
            h_raw = h.to(dt)[sel]
            hT = h_raw / T
            bT = None if b is None else b.to(dt) / T
            ids_s, lz, gz, gp = ids[sel], log_z[sel, None], g_log_z[sel, None], g_picked[sel]
            lo = log_out[sel].nan_to_num(neginf=0.0)[:, None]  # empty tail: exp(-inf - 0) = 0
            go = g_log_out[sel, None]
            n = sel.numel()
            work = Workspace(dt, h.device)
            dh_s = torch.zeros(n, h.shape[1], dtype=dt, device=h.device) if need_h else None
            ones = torch.ones(n, dtype=dt, device=h.device)
            for v0 in range(0, V, vc):
                for r0 in range(0, n, tc):
                    rows = slice(r0, min(r0 + tc, n))
                    shape = (rows.stop - r0, min(vc, V - v0))
                    z = head_logits(work.get(0, shape), hT[rows], w, bT, v0)
                    if masked:
                        clamp_masked(z)
                    G = torch.sub(z, lz[rows], out=work.get(1, shape)).exp_().mul_(gz[rows])
                    local = ids_s[rows] - v0
                    inside = (local >= 0) & (local < z.shape[1])
                    idx = local.clamp(0, z.shape[1] - 1)
                    if with_tail:
                        p_out = _mask_ids(z, idx, inside).sub_(lo[rows]).exp_()
                        G.add_(p_out.mul_(go[rows]))
                    G.scatter_add_(1, idx, torch.where(inside, gp[rows], 0.0))
                    dh_r = None if dh_s is None else dh_s[rows]
                    head_grads(G, v0, w, h_raw[rows], dh_r, dw, db, ones[rows])
            if need_h:
                dh[sel] = dh_s
        out = []
        for grad, like in ((dh, h), (dw, w), (db, b)):  # in place: dw is [V, H]
            out.append(None if grad is None else grad.div_(T).to(like.dtype))
        return (*out, None, None, None, None, None)


def _flat(hidden: torch.Tensor, weight: torch.Tensor, bias, ids: torch.Tensor):
    check_head("student", hidden, weight, bias)
    return hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1]).long()


def fused_token_logprobs(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """log softmax((hidden @ W.T + b) / temperature)[token_ids], without [N, V] logits.

    Shapes `[..., H], [V, H], [...] -> [...]` (float32, float64 for float64 inputs);
    differentiable w.r.t. hidden, weight and bias. This is the student's log p_S(y_t) of the
    sampled-token estimators (`reverse_kl_k1`, `distill_advantages`,
    `policy_gradient_loss`). `temperature` divides the logits; pass the sampler's to match
    the sampling policy's log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.shape[:-1] != token_ids.shape:
        raise ValueError(
            f"token_ids {tuple(token_ids.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    h, ids = _flat(hidden, head_weight, head_bias, token_ids.unsqueeze(-1))
    V = head_weight.shape[0]
    picked, log_z, _ = _HeadGather.apply(
        h, head_weight, head_bias, ids, float(temperature), token_chunk, vocab_chunk or V, False
    )
    return (picked[:, 0] - log_z).reshape(token_ids.shape)


def fused_sparse_token_divergence(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    kd_temperature: float = 1.0,
    student_head_bias: torch.Tensor | None = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk: int | None = DEFAULT_VOCAB_CHUNK,
    teacher_tail_logmass: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_token_divergence(student_hidden @ W.T + b, ids, logprobs, kind, ...)` from the
    student's hidden states and head, without [N, V] logits.

    Shapes `[..., H], [V, H], [..., k], [..., k] -> [...]`. The teacher's top-k log-probs are
    normalized over the full vocabulary (their tail is implied) and must come from the same
    `kd_temperature`, which here divides the student's logits. `teacher_tail_logmass [...]`:
    the teacher's reported tail, as in `sparse_token_divergence`.
    """
    check_kind(kind, beta=beta, alpha=alpha)
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
            f"{tuple(teacher_topk_logprobs.shape)} must have the same shape"
        )
    if student_hidden.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} must match hidden's leading dims "
            f"{tuple(student_hidden.shape[:-1])}"
        )
    if kd_temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    ids, pad = padded_ids(teacher_topk_ids)
    h, ids = _flat(student_hidden, student_head_weight, student_head_bias, ids)
    pad = pad.reshape(ids.shape)
    V = student_head_weight.shape[0]
    picked, log_z, log_out = _HeadGather.apply(
        h, student_head_weight, student_head_bias, ids, float(kd_temperature),
        token_chunk, vocab_chunk or V, True,
    )  # fmt: skip
    head = picked - log_z[:, None]
    tail = bucket_tail(head, log_out - log_z, pad)  # -inf when the ids cover the vocabulary
    student = without_padding(torch.cat([head, tail[:, None]], dim=-1), pad)
    t_head = teacher_topk_logprobs.reshape(ids.shape).to(student.dtype)
    t_head = torch.where(pad, torch.full_like(t_head, -math.inf), t_head)
    tail_t = None
    if teacher_tail_logmass is not None:
        tail_t = teacher_tail_logmass.reshape(ids.shape[:-1])
    teacher = teacher_buckets(t_head, V, tail_t, student.dtype)
    out = divergence_from_logprobs(student, teacher, kind, beta=beta, alpha=alpha)
    return out.reshape(teacher_topk_ids.shape[:-1])
