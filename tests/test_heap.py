"""`opd.run.heap.release_freed_heap`: freed heap goes back to the OS, and the loop trims once,
before the optimizer's state exists (the step where it lowers the peak)."""

from __future__ import annotations

import sys

import pytest
import torch

from opd.run import loop
from opd.run.heap import release_freed_heap


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os():
    # ~128 MB in 64 KB tensors: below glibc's mmap threshold, so they live in the heap, and
    # freeing every other one leaves holes that glibc keeps (the top of the heap is in use).
    keep = [torch.ones(16 * 1024) for _ in range(2000)]
    del keep[::2]
    before = _rss_kb()
    assert release_freed_heap()
    freed_mb = (before - _rss_kb()) / 1024
    assert freed_mb > 30, f"RSS fell by {freed_mb:.1f} MB only"
    assert all(float(t[0]) == 1.0 for t in keep)  # what is live is untouched


def test_the_loop_trims_once_before_the_optimizer_state_exists(monkeypatch):
    calls = []
    monkeypatch.setattr(loop, "release_freed_heap", lambda: calls.append(1))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    class Run:  # the parts of RunSetup that optimizer_step reads
        student, scaler, teacher = model, None, object()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        config = type("C", (), {"optim": type("O", (), {"max_grad_norm": 1.0})()})()
        world = type("W", (), {"clip_grad_norm": staticmethod(
            lambda m, ps, n: float(torch.nn.utils.clip_grad_norm_(ps, n)))})()  # fmt: skip

    Run.optimizer = optimizer
    for _ in range(3):
        model(torch.randn(4, 3)).square().sum().backward()
        loop.optimizer_step(Run, 1.0)
    assert calls == [1]  # the first step only: later ones reuse the heap for the same shapes
    assert optimizer.state  # and the optimizer did step
