"""Sampled-token estimators: only the log-prob of the token that was actually sampled.

These need no teacher distribution beyond one number per position, which is what makes
on-policy distillation cheap with a remote teacher (Thinking Machines, "On-Policy
Distillation", 2025; tinker-cookbook). With `y_t ~ p_S`:

* k1 = log p_S(y_t) - log p_T(y_t) is an unbiased estimate of KL(S||T) at that position;
* k3 = (r - 1) - log r with r = p_T(y_t)/p_S(y_t) is unbiased too and never negative
  (Schulman, "Approximating KL divergence", 2020).

The policy-gradient form uses A_t = -(log p_S - log p_T) as a per-token advantage and
minimizes -(p_S/q)(y_t) * A_t, q the sampling policy, so its gradient is the REINFORCE
gradient of the reverse KL. Advantages carry no gradient.
"""

from __future__ import annotations

import torch


def reverse_kl_k1(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimate per position, `[...] x [...] -> [...]`; may be negative per sample."""
    return student_logprobs - teacher_logprobs


def reverse_kl_k3(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate per position, `[...] x [...] -> [...]`; always >= 0."""
    log_ratio = teacher_logprobs - student_logprobs
    return torch.expm1(log_ratio) - log_ratio


def span_sums(values_BT: torch.Tensor, span_end_BT: torch.Tensor) -> torch.Tensor:
    """Each span's sum of `values` at its last column (`span_end`: the column of the last
    token of each position's span, -1 outside any span), zero elsewhere. A one-token span
    keeps its value exactly (0 + a = a)."""
    B, T = values_BT.shape
    inside = span_end_BT >= 0
    flat = (torch.arange(B, device=values_BT.device)[:, None] * T + span_end_BT)[inside]
    out = torch.zeros(B * T, dtype=values_BT.dtype, device=values_BT.device)
    return out.index_add(0, flat, values_BT[inside]).view(B, T)


def distill_advantages(
    student_logprobs_BT: torch.Tensor,
    teacher_logprobs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    discount: float = 0.0,
    span_end_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantage A_t = -(log p_S - log p_T), optionally discounted to go.

    With discount gamma > 0, A_t = sum_{k>=t} gamma^(k-t) * a_k over unmasked positions of
    the same row (tinker-cookbook's `kl_discount_factor`); gamma = 0 keeps each token's own
    value. Returned without gradient. Shapes `[B, T]`.

    `span_end_BT` (a teacher with another tokenizer, `opd.teachers.cross_tokenizer`): the
    teacher's log-prob of a span's tokens sits at the span's last token, and the student's
    log-probs are summed over the same span to meet it there: the span's reward r =
    log p_T(span) - log p_S(span) (`span_sums`; rewards sum to log p_T(text) - log p_S(y)
    over a row). A span is one action: every one of its tokens takes the advantage at the
    span's end (r with discount 0, else the discounted return from there), so the gradient
    is the score function of the whole span's log-prob, not of its last token alone (which
    left the earlier tokens' choices untrained and collapsed the student in
    `benchmarks/cross_tokenizer.py`). With one token per span this is the per-token
    advantage.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    per_token = -(student_logprobs_BT.detach() - teacher_logprobs_BT.detach())
    per_token = torch.where(mask_BT.bool(), per_token, torch.zeros_like(per_token))
    span_end = None
    if span_end_BT is not None:
        span_end = torch.where(mask_BT.bool(), span_end_BT.to(per_token.device), -1)
        per_token = span_sums(per_token, span_end)
    if discount == 0.0:
        returns = per_token
    else:
        returns = torch.zeros_like(per_token)
        running = torch.zeros_like(per_token[..., 0])
        for t in range(per_token.shape[-1] - 1, -1, -1):
            running = per_token[..., t] + discount * running
            returns[..., t] = running
        returns = torch.where(mask_BT.bool(), returns, torch.zeros_like(returns))
    if span_end is None:
        return returns
    at_end = returns.gather(-1, span_end.clamp(min=0))  # each token: its span's advantage
    return torch.where(span_end >= 0, at_end, torch.zeros_like(at_end))


def policy_gradient_loss(
    student_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    sampler_logprobs_BT: torch.Tensor | None = None,
    ratio_cap: float = 0.0,
    correction: str = "tis",
    ratio_floor: float = 0.0,
) -> torch.Tensor:
    """Per-token importance-weighted policy-gradient loss -(p_S/q)(y_t) * A_t.

    `sampler_logprobs_BT` is log q of the sampled tokens under the policy that produced
    them (for a stale sample: the older weights that drew it); None means the sampler is
    the current student, so the ratio is exactly 1 in value and its gradient is the score
    function. Corrections of the ratio (for vLLM's mismatch and for stale samples):

    * `tis` with `ratio_cap > 0`: truncated importance sampling (TRL, slime; Yao et al.
      2025): the weight min(p_S/q, cap) is held constant and multiplies the score-function
      gradient, equal to the uncapped loss wherever the ratio is below the cap;
    * `icepop`: tokens whose ratio lies outside [ratio_floor, ratio_cap] contribute
      nothing (NeMo-RL's ICE-POP); the others keep the plain ratio.

    Returns `[B, T]`, unreduced.
    """
    q = student_logprobs_BT.detach() if sampler_logprobs_BT is None else sampler_logprobs_BT
    ratio = torch.exp(student_logprobs_BT - q.detach())
    if correction == "icepop":
        kept = (ratio.detach() >= ratio_floor) & (ratio.detach() <= ratio_cap)
        ratio = torch.where(kept, ratio, torch.zeros_like(ratio))
    elif correction != "tis":
        raise ValueError(f"importance-ratio correction {correction!r} is not tis or icepop")
    elif ratio_cap > 0:
        weight = ratio.detach().clamp(max=ratio_cap)
        ratio = weight * torch.exp(student_logprobs_BT - student_logprobs_BT.detach())
    return -ratio * advantages_BT.detach()
