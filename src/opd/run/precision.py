"""Numeric precision of training: autocast, the fp16 loss scaler, gradient checkpointing.

The weights AdamW updates stay float32 (master weights): `bf16: true` / `fp16: true` run
the forward and loss under autocast in 16 bits on CUDA, as HF Trainer and TRL do. A student
loaded in 16 bits and fully fine-tuned would have no float32 copy (AdamW's updates of
~lr * 1 round away against a bf16 weight's 8-bit mantissa), so that is refused at config
time (`opd.config.checks`); LoRA adapters on a 16-bit base are kept in float32 by peft.

float16 has a narrow range: small gradients underflow to zero. `torch.amp.GradScaler`
multiplies the loss by a scale (2**16 at first) before backward, divides the gradients by
it before clipping, skips the update of a step whose gradients overflowed and halves the
scale (doubling it after 2,000 clean steps). It runs with `fp16: true` and with a float16
LoRA base; its state is checkpointed so a resumed run scales as the uninterrupted one.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

log = logging.getLogger("opd")


def autocast(config, device: torch.device):
    """The forward and loss of a micro-batch: 16-bit autocast on CUDA, else as loaded."""
    if device.type != "cuda":
        return nullcontext()
    if config.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if config.fp16:
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def make_scaler(config, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler for float16 compute (None when nothing runs in float16)."""
    if not (config.fp16 or config.student.dtype == "float16"):
        return None
    return torch.amp.GradScaler(device.type)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them
    (transformers' own, non-reentrant: works under LoRA, whose frozen embeddings give the
    first layer no input that requires grad, and under FSDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.20's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    log.info("student: gradient checkpointing on (activations recomputed in backward)")
