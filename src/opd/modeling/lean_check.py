"""Start-up check of the lean forward against the model's own Hugging Face forward.

`opd.modeling.lean` re-implements the Llama/Qwen decoder layer from the model's submodules.
A transformers release that changes what one of them means (a renamed attribute, a norm
moved, a new rotary variant) would make it compute something else without any error: wrong
samples, wrong gradients. So the first batch each model meets on that path also runs
through the Hugging Face forward. Under the default `auto` (`sampling.engine`,
`loss.fused_forward`) a mismatch is logged and that model takes the Hugging Face forward
from then on (`fall_back`); asked for by name (`lean`), a mismatch stops the run with a
message naming the key that turns the lean path off.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING

import torch
import transformers

from opd.modeling.lean import lean_supported

if TYPE_CHECKING:  # annotations only: modeling sits below the data room
    from opd.data.batch import SequenceBatch


# Relative L2 error allowed between the two forwards: float32 rounding in a different order
# of operations (joint projections, fused norms) stays near 1e-6; low-precision dtypes round
# each op's output, so they get a wider band. A structural slip (RoPE, a norm, a projection)
# shows up at 1e-1 and more.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

_packed_checked: weakref.WeakSet = weakref.WeakSet()
_decoder_checked: weakref.WeakSet = weakref.WeakSet()
_refused: weakref.WeakSet = weakref.WeakSet()  # failed a check under `auto`: HF from then on

log = logging.getLogger("opd")


class LeanMismatch(RuntimeError):
    """The lean forward disagrees with the Hugging Face forward on the first batch."""

    def __init__(self, finding: str, key: str):
        self.finding = finding
        super().__init__(f"{finding}. Set {key}=hf to use the Hugging Face forward.")


def _describe(model) -> str:
    config = model.config
    return f"{getattr(config, '_name_or_path', '') or type(model).__name__} ({config.model_type})"


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    return float((got.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _compare(what: str, key: str, model, got: torch.Tensor, ref: torch.Tensor) -> None:
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 3e-2)
    err = relative_error(got, ref)
    if not err <= tol:  # also catches NaN
        raise LeanMismatch(
            f"the lean {what} of {_describe(model)} in {str(dtype).removeprefix('torch.')} "
            f"differs from its Hugging Face forward on the first batch (relative error "
            f"{err:.2e} > {tol:.0e}); transformers {transformers.__version__} may have changed "
            "this architecture",
            key,
        )


def lean_applies(model, mode: str) -> bool:
    """Whether `mode` (`hf` | `lean` | `auto`) runs `model` through the lean path: `lean`
    and `auto` for the architectures it supports (an FSDP-sharded model is not one), `auto`
    unless a check refused the model, or it checkpoints its activations and grad is on."""
    if mode not in ("lean", "auto") or not lean_supported(model):
        return False
    # checkpointing does not reach the lean layer loop (`lean` with it is refused at config);
    # it only matters where a graph is built: sampling and scoring still take the lean path
    training = torch.is_grad_enabled() and _checkpointing(model)
    return mode == "lean" or (model not in _refused and not training)


def _checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old name
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


def fall_back(model, mode: str, err: LeanMismatch) -> None:
    """After a failed check: under `auto`, say so and take the HF forward for this model from
    now on; a path asked for by name (`lean`) stops the run with `err`."""
    if mode != "auto":
        raise err
    _refused.add(model)
    log.warning("%s: the Hugging Face forward runs this model from now on (auto)", err.finding)


@torch.no_grad()
def check_packed_forward(model, batch: SequenceBatch, key: str = "loss.fused_forward") -> None:
    """Once per model: `packed_supervised_hidden` against `completion_hidden` on `batch`."""
    from opd.modeling.hf import completion_hidden
    from opd.modeling.lean import packed_supervised_hidden

    if model in _packed_checked or not bool(batch.loss_mask().any()):
        return
    got = packed_supervised_hidden(model, batch)
    ref = completion_hidden(model, batch)[batch.loss_mask()]
    _compare("packed forward", key, model, got, ref)
    _packed_checked.add(model)


@torch.no_grad()
def check_decoder(
    model, ids_BP: torch.Tensor, real_BP: torch.Tensor, vocab_size: int,
    key: str = "sampling.engine",
) -> None:  # fmt: skip
    """Once per model: `LeanDecoder`'s prefill and one step (both the growing and the
    fixed-shape variant) against the model's forward on the same left-padded prompts."""
    if model in _decoder_checked:
        return
    was_training = model.training
    model.eval()  # the reference is the model's own forward as inference runs it
    try:
        _check_decoder(model, ids_BP, real_BP, vocab_size, key)
    finally:
        model.train(was_training)
    _decoder_checked.add(model)


def _check_decoder(model, ids_BP, real_BP, vocab_size: int, key: str) -> None:
    from opd.modeling.lean_decoder import LeanDecoder

    B, P = ids_BP.shape
    positions = (real_BP.long().cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=ids_BP, attention_mask=real_BP, position_ids=positions).logits
    lean = LeanDecoder(model, vocab_size, B, P + 1)
    got = lean.prefill(ids_BP, real_BP)
    _compare("decoder (prefill)", key, model, got, ref[:, -1, :vocab_size])
    token = got.argmax(-1)
    ids = torch.cat([ids_BP, token[:, None]], 1)
    real = torch.cat([real_BP, torch.ones_like(real_BP[:, :1])], 1)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=ids, attention_mask=real, position_ids=positions).logits[:, -1]
    step = lean.step(token, real_BP.sum(-1), P)
    _compare("decoder (step)", key, model, step, ref[:, :vocab_size])
    column = torch.full((1,), P, dtype=torch.long, device=ids.device)
    static = lean.step_static(token, real_BP.sum(-1), column)
    _compare("decoder (fixed-shape step)", key, model, static, ref[:, :vocab_size])
