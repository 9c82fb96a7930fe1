"""Pure loss functions over tensors: no models, no I/O."""

from opd.losses.divergence import (
    DEFAULT_SKEW_ALPHA,
    KINDS,
    check_kind,
    divergence_from_logprobs,
    token_divergence,
)
from opd.losses.fused import fused_token_divergence
from opd.losses.fused_sampled import fused_sparse_token_divergence, fused_token_logprobs
from opd.losses.reduce import masked_mean, masked_sum, sequence_mean
from opd.losses.sampled import (
    distill_advantages,
    policy_gradient_loss,
    reverse_kl_k1,
    reverse_kl_k3,
)
from opd.losses.sparse import fold_student_to_buckets, log_tail_mass, sparse_token_divergence

__all__ = [
    "DEFAULT_SKEW_ALPHA",
    "KINDS",
    "check_kind",
    "distill_advantages",
    "divergence_from_logprobs",
    "fold_student_to_buckets",
    "fused_sparse_token_divergence",
    "fused_token_divergence",
    "fused_token_logprobs",
    "log_tail_mass",
    "masked_mean",
    "masked_sum",
    "policy_gradient_loss",
    "reverse_kl_k1",
    "reverse_kl_k3",
    "sequence_mean",
    "sparse_token_divergence",
    "token_divergence",
]
