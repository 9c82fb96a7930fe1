"""The fused head's generic path: checkpointed token tiles over the plain divergence.

`fused.py` has closed-form gradients for the kinds it knows (`fused_kinds.py`). Any other
kind of `divergence.py` runs here, so that a divergence added in that one file works on
the fused path too: rows are taken `token_chunk` at a time, both models' `[token_chunk, V]`
logits are formed, and the plain `token_divergence` gives the values; the tile runs under
activation checkpointing, so its logits and softmax intermediates are freed after the
forward and rebuilt, one tile at a time, in the backward (as TRL's
`_chunked_divergence_loss` does). Peak memory is a few `token_chunk x V` float32 tensors
plus the weight gradient; the cost is a second forward of each tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd.losses import divergence
from opd.losses.divergence import _compute_dtype

# Rows per tile. Autograd through `token_divergence` keeps about ten [rows, V] float32
# tensors per tile (logits, log-softmax, the mixture and its terms): 32 rows at V = 151,936
# are ~200 MB at the peak of a tile's backward.
DEFAULT_GENERIC_CHUNK = 32


def _tile(hs, ws, bs, ht, wt, bt, kind, beta, alpha, temperature):
    """Per-token divergence of one tile of rows, from both heads' full-vocabulary logits."""
    dt = _compute_dtype(hs)
    zs = F.linear(hs.to(dt), ws.to(dt), None if bs is None else bs.to(dt))
    with torch.no_grad():
        zt = F.linear(ht.to(dt), wt.to(dt), None if bt is None else bt.to(dt))
    # Looked up on the module, so a kind added to divergence.py is found here as well.
    return divergence.token_divergence(
        zs, zt, kind, beta=beta, alpha=alpha, temperature=temperature
    )


def chunked_token_divergence(
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
    token_chunk: int = DEFAULT_GENERIC_CHUNK,
) -> torch.Tensor:
    """`token_divergence(h_S @ W_S.T + b_S, h_T @ W_T.T + b_T, kind, ...)` per token, `[N]`.

    Shapes `[N, Hs], [V, Hs], [N, Ht], [V, Ht]`, biases `[V]`; float32 (float64 for float64
    inputs). Gradients reach the student's hidden states, weight and bias; the teacher is
    constant. Arguments are validated by the caller (`fused_token_divergence`)."""
    hs, ht = student_hidden, teacher_hidden.detach()
    wt = teacher_head_weight.detach()
    bt = None if teacher_head_bias is None else teacher_head_bias.detach()
    args = (kind, beta, alpha, float(kd_temperature))
    student = [student_hidden, student_head_weight, student_head_bias]
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student)
    out = []
    for r0 in range(0, hs.shape[0], max(1, token_chunk)):
        rows = slice(r0, r0 + token_chunk)
        tile = (hs[rows], student_head_weight, student_head_bias, ht[rows], wt, bt, *args)
        if track:
            out.append(checkpoint(_tile, *tile, use_reentrant=False))
        else:
            out.append(_tile(*tile))
    if not out:
        return hs.new_zeros(0, dtype=_compute_dtype(hs))
    return torch.cat(out)
