"""The divergence names and their parameter ranges: no torch, so configs validate fast."""

from __future__ import annotations

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
DEFAULT_SKEW_ALPHA = 0.1


def check_kind(kind: str, *, beta: float | None = None, alpha: float | None = None) -> None:
    """Validate a divergence name and its parameter; the message names the bad value."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind == "jsd":
        if beta is None:
            raise ValueError("divergence 'jsd' needs beta (0 < beta < 1), e.g. beta=0.5")
        if beta == 0.0:
            raise ValueError(
                "jsd with beta=0 is identically zero under the GKD definition; TRL maps "
                "beta=0 to KL(teacher||student): use kind='forward_kl'"
            )
        if beta == 1.0:
            raise ValueError(
                "jsd with beta=1 is identically zero under the GKD definition; TRL maps "
                "beta=1 to KL(student||teacher): use kind='reverse_kl'"
            )
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    if kind.startswith("skew") and alpha is not None and not 0.0 <= alpha < 1.0:
        raise ValueError(f"{kind} alpha must be in [0, 1), got {alpha}")
