"""Gradient clipping: torch's result, without touching gradients under the limit."""

import math

import pytest
import torch

from opd.run.world import World


def _params(scale: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((7, 5), (11,), (3, 4))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped, as by torch
    return params


@pytest.mark.parametrize("scale", [1e-3, 0.3, 5.0, float("nan")])
@pytest.mark.parametrize("max_norm", [1.0, float("inf")])
def test_clip_equals_torch_and_leaves_gradients_under_the_limit_alone(scale, max_norm):
    ours, ref = _params(scale), _params(scale)
    versions = [p.grad._version for p in ours if p.grad is not None]
    got = World().clip_grad_norm(None, ours, max_norm)
    want = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
    assert got == want or (math.isnan(got) and math.isnan(want))
    for a, b in zip(ours, ref, strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad) or bool(
                a.grad.isnan().all() and b.grad.isnan().all()
            )
    touched = [p.grad._version for p in ours if p.grad is not None] != versions
    # scaled exactly when the norm is over the limit (or not finite)
    assert touched == (not math.isfinite(want) or want + 1e-6 > max_norm)
