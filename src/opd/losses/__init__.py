"""Pure loss functions over tensors: no models, no I/O.

Names are imported from their submodule on first use (PEP 562), so that `opd.losses.kinds`
(divergence names, checked by every config) loads without torch.
"""

import importlib

_WHERE = {
    "DEFAULT_SKEW_ALPHA": "kinds",
    "KINDS": "kinds",
    "check_kind": "kinds",
    "divergence_from_logprobs": "divergence",
    "token_divergence": "divergence",
    "fused_token_divergence": "fused",
    "fused_sparse_token_divergence": "fused_sampled",
    "fused_token_logprobs": "fused_sampled",
    "masked_mean": "reduce",
    "masked_sum": "reduce",
    "sequence_mean": "reduce",
    "distill_advantages": "sampled",
    "policy_gradient_loss": "sampled",
    "reverse_kl_k1": "sampled",
    "reverse_kl_k3": "sampled",
    "fold_student_to_buckets": "sparse",
    "log_tail_mass": "sparse",
    "sparse_token_divergence": "sparse",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"opd.losses.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'opd.losses' has no attribute {name!r}")


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
