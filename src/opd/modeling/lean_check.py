"""Start-up check of the lean forward against the model's own Hugging Face forward.

`opd.modeling.lean` re-implements the Llama/Qwen decoder layer from the model's submodules.
A transformers release that changes what one of them means (a renamed attribute, a norm
moved, a new rotary variant) would make it compute something else without any error: wrong
samples, wrong gradients. So it runs only where a config asks for it (`sampling.engine=lean`,
`loss.fused_forward=lean`), and the first batch each model meets on that path also runs
through the Hugging Face forward; a mismatch stops the run with a message naming the key
that turns the lean path off.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import transformers

if TYPE_CHECKING:  # annotations only: modeling sits below the data room
    from opd.data.batch import SequenceBatch


# Relative L2 error allowed between the two forwards: float32 rounding in a different order
# of operations (joint projections, fused norms) stays near 1e-6; low-precision dtypes round
# each op's output, so they get a wider band. A structural slip (RoPE, a norm, a projection)
# shows up at 1e-1 and more.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

_packed_checked: weakref.WeakSet = weakref.WeakSet()
_decoder_checked: weakref.WeakSet = weakref.WeakSet()


class LeanMismatch(RuntimeError):
    """The lean forward disagrees with the Hugging Face forward on the first batch."""


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
            f"this architecture. Set {key}=hf to use the Hugging Face forward."
        )


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
    from opd.modeling.lean import LeanDecoder

    if model in _decoder_checked:
        return
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
    _decoder_checked.add(model)
