"""Which decoder forward computes final hidden states: the model's own or the lean packed one.

`loss.fused_forward` names it for the fused objectives and for a local teacher's scores
(`hf` | `lean` | `auto`, the default): `auto` and `lean` run `opd.modeling.lean`'s packed
forward for the models it covers (real tokens only; checked against the Hugging Face
forward on each model's first batch, `opd.modeling.lean_check`), every other model the
Hugging Face forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from opd.modeling.hf import completion_hidden
from opd.modeling.lean import packed_supervised_hidden
from opd.modeling.lean_check import LeanMismatch, check_packed_forward, fall_back, lean_applies

if TYPE_CHECKING:  # annotations only: modeling sits below the data room
    from opd.data.batch import SequenceBatch


def supervised_hidden(model, batch: SequenceBatch, forward: str = "hf") -> torch.Tensor:
    """`completion_hidden(model, batch)[batch.loss_mask()]`, `[N, H]`.

    `forward` `lean`, or `auto`: the packed forward of `opd.modeling.lean`, checked against
    the Hugging Face forward on the first batch of each model (`auto` falls back on a
    mismatch, `lean` stops); models it does not support take the Hugging Face forward."""
    if lean_applies(model, forward):
        try:
            check_packed_forward(model, batch)
            return packed_supervised_hidden(model, batch)
        except LeanMismatch as err:
            fall_back(model, forward, err)
    return completion_hidden(model, batch)[batch.loss_mask()]
