"""Per-token divergences between a student and a teacher next-token distribution.

Every function here is pure: tensors in, one value per position out (`[..., V] -> [...]`).
Reduction over positions lives in `reduce.py`, so that the token count used for the mean
can be the global one (gradient accumulation, several processes).

Conventions
-----------
* Computation is in float32 (or float64 if the inputs are float64); bf16/fp16 inputs are
  upcast before `log_softmax`.
* `temperature` divides both models' logits before normalisation (the loss temperature,
  `kd_temperature` in configs). It is never the sampling temperature. The result is *not*
  multiplied by T^2 (Hinton's rescaling); scale the loss weight instead if you want it.
* Entries whose probability is exactly zero (logit `-inf`, e.g. masked vocabulary) add
  nothing and never produce NaN, neither in the value nor in the gradient.
* A NaN anywhere in a position's inputs makes that position's value NaN (never a silent
  zero), so the training step is skipped and reported.
* `jsd` is the generalized JSD of the GKD paper (Agarwal et al., 2024, eq. 2):
  `JSD(beta) = beta*KL(T||M) + (1-beta)*KL(S||M)`, `M = beta*T + (1-beta)*S`.
  It is defined for 0 < beta < 1. At beta = 0 and beta = 1 the mixture equals one of the
  two distributions and the definition is identically zero, a useless loss. TRL's
  `GKDTrainer.generalized_jsd_loss` instead special-cases the endpoints: beta=0 becomes
  KL(T||S) (our `forward_kl`) and beta=1 becomes KL(S||T) (our `reverse_kl`). We refuse
  beta in {0, 1} with an error that names the kind to use, rather than silently switching
  divergence. For 0 < beta < 1 the two agree exactly (TRL additionally averages with
  `batchmean`; we return per-position values). Note TRL also has the limit
  JSD(beta)/beta -> KL(T||S) as beta -> 0, so small beta behaves like scaled forward KL.
* `skew_forward_kl` / `skew_reverse_kl` follow DistiLLM (Ko et al., 2024):
  SKL(alpha) = KL(T || alpha*T + (1-alpha)*S), SRKL(alpha) = KL(S || alpha*S + (1-alpha)*T),
  alpha = 0.1 by default as in the paper.
"""

from __future__ import annotations

import math

import torch

from opd.losses.kinds import DEFAULT_SKEW_ALPHA, check_kind


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _kl_terms(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of p*(log p - log q), with 0*log 0 = 0 and finite gradients.

    The `where`s keep -inf out of the arithmetic: on zero-probability entries of p (0 log 0
    = 0), and where q is zero under p > 0, whose term is +inf in value but is formed
    outside the differentiated expression, so a row that a mask later drops (its value
    multiplied by nothing) contributes a zero gradient, never 0 * inf = NaN.
    """
    support = p_logp > -math.inf
    finite_q = q_logp > -math.inf
    p_safe = torch.where(support, p_logp, torch.zeros_like(p_logp))
    q_safe = torch.where(support & finite_q, q_logp, torch.zeros_like(q_logp))
    terms = torch.exp(p_safe) * (p_safe - q_safe)
    terms = torch.where(finite_q, terms, torch.full_like(terms, math.inf))
    return torch.where(support, terms, torch.zeros_like(terms)).sum(-1)


def _log_mix(a_logp: torch.Tensor, b_logp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * A + (1 - weight_a) * B), computed in log space."""
    if weight_a <= 0.0:
        return b_logp
    stacked = torch.stack([a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a)])
    # Where both are -inf the mixture is -inf too; reduce over zeros there so logsumexp's
    # backward never evaluates exp(-inf - -inf) = NaN.
    empty = (stacked == -math.inf).all(dim=0)
    safe = torch.where(empty.unsqueeze(0), torch.zeros_like(stacked), stacked)
    mixed = torch.logsumexp(safe, dim=0)
    return torch.where(empty, torch.full_like(mixed, -math.inf), mixed)


def divergence_from_logprobs(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
) -> torch.Tensor:
    """Divergence between two normalized log-distributions over the last dim.

    Shapes `[..., K] x [..., K] -> [...]`. `K` may be the full vocabulary or the k+1
    buckets of a sparse (top-k + tail) teacher. Inputs must already be log-probabilities
    (this skips the `log_softmax` that `token_divergence` does).
    """
    check_kind(kind, beta=beta, alpha=alpha)
    out = _divergence(student_logprobs, teacher_logprobs, kind, beta, alpha)
    # `_kl_terms` reads a NaN log-prob as "outside the support" and adds 0 for it, so a NaN
    # teacher row would become a silent zero loss. A NaN anywhere in a row makes its value
    # NaN instead, so the step is skipped and reported (log-probs are never +inf, so a row
    # sums to NaN exactly when it holds one; the sum costs [...] memory, not [..., K]).
    bad = student_logprobs.detach().sum(-1).isnan() | teacher_logprobs.detach().sum(-1).isnan()
    return torch.where(bad, torch.full_like(out, math.nan), out)


def _divergence(s: torch.Tensor, t: torch.Tensor, kind: str, beta, alpha) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl_terms(t, s)
    if kind == "reverse_kl":
        return _kl_terms(s, t)
    if kind == "jsd":
        m = _log_mix(t, s, beta)
        return beta * _kl_terms(t, m) + (1.0 - beta) * _kl_terms(s, m)
    if kind == "tvd":
        return 0.5 * (torch.exp(t) - torch.exp(s)).abs().sum(-1)
    skew = DEFAULT_SKEW_ALPHA if alpha is None else alpha
    if kind == "skew_forward_kl":
        return _kl_terms(t, _log_mix(t, s, skew))
    return _kl_terms(s, _log_mix(s, t, skew))  # skew_reverse_kl


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence from raw logits, `[..., V] x [..., V] -> [...]`.

    kind: forward_kl = KL(T||S), reverse_kl = KL(S||T), jsd (needs beta in (0, 1)),
    tvd, skew_forward_kl, skew_reverse_kl (alpha, default 0.1). See the module docstring.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary sizes differ: student {student_logits.shape[-1]} vs teacher "
            f"{teacher_logits.shape[-1]}; slice both to the shared vocabulary first"
        )
    if temperature <= 0:
        raise ValueError(f"kd_temperature must be > 0, got {temperature}")
    dtype = _compute_dtype(student_logits)
    s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return divergence_from_logprobs(s, t, kind, beta=beta, alpha=alpha)
