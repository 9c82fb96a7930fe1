"""Calling into a model through a DDP or FSDP wrapper's own forward.

The fused objectives need more than the model's logits: its decoder's hidden states and its
LM-head weight, which they combine in tiles. Called on the model directly, a wrapper's
hooks would not run: DDP would not prepare its reducer (gradients would not be averaged
over ranks) and FSDP would not gather the sharded weights. `as_forward(student, fn)` runs
`fn(model)` *as* the wrapper's forward instead: the model inside the wrapper gets `fn` as
its forward for one call, so every hook runs as for an ordinary forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _wrappers() -> tuple[type, ...]:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    return (DistributedDataParallel, FullyShardedDataParallel)


def inner_model(student: torch.nn.Module) -> torch.nn.Module:
    """The model a DDP / FSDP1 wrapper holds; an FSDP2 model (sharded in place) or a plain
    model is itself."""
    return student.module if isinstance(student, _wrappers()) else student


def _fsdp2(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def as_forward(student: torch.nn.Module, fn: Callable[[torch.nn.Module], T]) -> T:
    """`fn(model)`, with `model` the student inside any wrapper, run as the wrapper's forward
    (a plain model: called directly)."""
    model = inner_model(student)
    if model is student and not _fsdp2(model):
        return fn(model)
    # An instance attribute shadows the class's forward for this one call: `student()`
    # runs the wrapper's pre-forward (FSDP all-gather, DDP's reducer), then `fn`.
    model.forward = lambda: fn(model)
    try:
        return student()
    finally:
        del model.forward
