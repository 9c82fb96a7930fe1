"""Divergences to the teacher on fixed samples, and the exposure-bias gap.

Exposure-bias gap (ours): the student's mean per-token divergence to the teacher on
prefixes the student sampled itself, minus the same on prefixes the teacher sampled,
`E_{y~p_S}[D(y|x)] - E_{y~p_T}[D(y|x)]`. Offline KD trains only on the second kind of
state; a large gap is the cost of never seeing one's own mistakes.

Memory: logits exist `ROWS` supervised positions at a time, from the models' hidden states
and LM heads (as the teacher scores top-k, `opd.teachers.base.scores_from_hidden`): at
1,024 positions x 64 rows x V = 151,936 one `[B, L, V]` float32 tensor would be 40 GB.
Models whose logits are more than their head on hidden states (`supports_fused_head`)
take their full logits instead, a chunk of sequences at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from opd.data.batch import assemble
from opd.data.encoding import Encoder
from opd.losses import masked_sum, token_divergence
from opd.modeling.hf import (
    completion_hidden,
    completion_logits,
    supports_fused_head,
    token_logprobs,
)

ROWS = 128  # supervised positions whose [ROWS, V] logits exist at once


@dataclass
class Rows:
    """One model's side of a chunk at its supervised positions (row-major), `[N, D]`: final
    hidden states (`head` set: logits are `head(values)`) or logits themselves."""

    values: torch.Tensor
    head: torch.nn.Module | None = None

    def logits(self, vocab_size: int, device) -> Iterator[torch.Tensor]:
        for r in range(0, self.values.shape[0], ROWS):
            part = self.values[r : r + ROWS]
            if self.head is not None:
                part = self.head(part.to(self.head.weight.device))
            yield part[:, :vocab_size].to(device)


def student_rows(model, batch, vocab_size: int) -> Rows:
    mask = batch.loss_mask()
    if supports_fused_head(model):
        hidden = completion_hidden(model, batch)[mask]
        return Rows(hidden, model.get_output_embeddings())
    return Rows(completion_logits(model, batch, vocab_size)[mask])


def teacher_rows(teacher, batch) -> Rows:
    """The teacher's side: hidden states where it returns them (local, self teacher), else
    its full logits."""
    model = getattr(teacher, "model", None)
    if hasattr(teacher, "supervised_hidden") and model is not None and supports_fused_head(model):
        hidden = teacher.supervised_hidden(batch, lambda m, b: completion_hidden(m, b)[b.loss_mask()])
        return Rows(hidden, model.get_output_embeddings())
    logits = teacher.score(batch, "logits").logits
    return Rows(logits[batch.loss_mask().to(logits.device)])


@torch.no_grad()
def heldout_loss(
    model,
    encoder: Encoder,
    rows: list[dict],
    *,
    prompt_field: str,
    completion_field: str,
    vocab_size: int,
    batch_size: int = 64,
) -> float:
    """Mean per-token cross-entropy (nats) of the rows' completions under `model`."""
    prompts = [encoder.prompt_ids(r[prompt_field]) for r in rows]
    completions = [encoder.completion_ids(r[completion_field]) for r in rows]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in _chunks(
            prompts, completions, encoder.tokenizer.pad_token_id, batch_size, device
        ):
            mask = batch.loss_mask()
            ids = batch.completion_ids()[mask]
            chunks = student_rows(model, batch, vocab_size).logits(vocab_size, device)
            for r, logits in zip(range(0, ids.numel(), ROWS), chunks, strict=True):
                total -= float(token_logprobs(logits, ids[r : r + ROWS]).sum())
            count += int(mask.sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _chunks(prompts, completions, pad_id: int, batch_size: int, device):
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        yield assemble(prompts[start:end], completions[start:end], pad_id=pad_id).to(device)


@torch.no_grad()
def teacher_states(teacher, prompts, completions, *, pad_id: int, batch_size: int = 64) -> list[Rows]:
    """The teacher's side of each chunk of `mean_divergences` (hidden states, or logits for
    a teacher without them). A frozen teacher's states on a fixed sample set can be
    computed once and passed back in (`precomputed`)."""
    chunks = _chunks(prompts, completions, pad_id, batch_size, teacher.device)
    return [teacher_rows(teacher, batch) for batch in chunks]


@torch.no_grad()
def mean_divergences(
    student,
    teacher,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    *,
    pad_id: int,
    vocab_size: int,
    kinds: Sequence[str] = ("reverse_kl",),
    beta: float | None = None,
    batch_size: int = 64,
    precomputed: list[Rows] | None = None,
) -> dict[str, float]:
    """Mean per-token divergence of the student from `teacher` (an `opd.teachers` teacher)
    on these sequences, one figure per kind, over all completion tokens. `precomputed`:
    the teacher's states from `teacher_states` on the same sequences and `batch_size`."""
    totals, count = dict.fromkeys(kinds, 0.0), 0
    chunks = _divergence_chunks(
        student,
        teacher,
        prompts,
        completions,
        pad_id,
        vocab_size,
        kinds,
        beta,
        batch_size,
        precomputed,
    )
    for mask, values in chunks:
        for kind in kinds:
            totals[kind] += float(masked_sum(values[kind], mask))
        count += int(mask.sum())
    return {kind: total / max(count, 1) for kind, total in totals.items()}


def _divergence_chunks(
    student,
    teacher,
    prompts,
    completions,
    pad_id,
    vocab_size,
    kinds,
    beta,
    batch_size,
    precomputed,
):
    """Per chunk of sequences: `(loss mask [B, L], {kind: divergence per token [B, L]})`,
    the student in eval mode meanwhile (shared by the mean and per-position views)."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        chunks = _chunks(prompts, completions, pad_id, batch_size, device)
        for i, batch in enumerate(chunks):
            mine = student_rows(student, batch, vocab_size)
            theirs = teacher_rows(teacher, batch) if precomputed is None else precomputed[i]
            parts = {k: [] for k in kinds}
            pairs = zip(mine.logits(vocab_size, device), theirs.logits(vocab_size, device))
            for s_logits, t_logits in pairs:
                for k in kinds:
                    parts[k].append(token_divergence(s_logits, t_logits, k, beta=beta))
            mask = batch.loss_mask()
            values = {}
            for k in kinds:  # back on the [B, L] grid, zero where unsupervised
                values[k] = torch.zeros(mask.shape, device=device)
                if parts[k]:
                    values[k][mask] = torch.cat(parts[k])
            yield mask, values
    finally:
        student.train(was_training)


def exposure_bias(
    student,
    teacher,
    own_samples: tuple[list[list[int]], list[list[int]]],
    teacher_samples: tuple[list[list[int]], list[list[int]]],
    *,
    pad_id: int,
    vocab_size: int,
    kinds: Sequence[str] = ("reverse_kl",),
    batch_size: int = 64,
    teacher_states_on_teacher_samples: list[Rows] | None = None,
) -> dict[str, dict[str, float]]:
    """Per kind: divergence on the student's own prefixes, on the teacher's, and the gap.

    Both sample sets are `(prompt ids, completion ids)` from `sample_completions` on the
    same rows. While only the student changes, the teacher's samples and its states on them
    (`teacher_states`) can be computed once and passed in."""
    common = {"pad_id": pad_id, "vocab_size": vocab_size, "kinds": kinds, "batch_size": batch_size}
    on_student = mean_divergences(student, teacher, *own_samples, **common)
    on_teacher = mean_divergences(
        student, teacher, *teacher_samples, **common, precomputed=teacher_states_on_teacher_samples
    )
    return {
        kind: {
            "div_on_student": on_student[kind],
            "div_on_teacher": on_teacher[kind],
            "exposure_gap": on_student[kind] - on_teacher[kind],
        }
        for kind in kinds
    }


@torch.no_grad()
def divergence_by_position(
    student,
    teacher,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    *,
    pad_id: int,
    vocab_size: int,
    kinds: Sequence[str] = ("reverse_kl",),
    batch_size: int = 64,
    precomputed: list[Rows] | None = None,
) -> dict[str, list[float]]:
    """Mean per-token divergence at each completion position j (0-based), over the
    sequences that have a token there; `"count"` holds how many that is per position.

    The per-position view of `mean_divergences` (same arguments): why exposure bias grows
    with length shows as the gap between own and teacher prefixes widening with j."""
    width = max((len(c) for c in completions), default=0)
    sums = {kind: torch.zeros(width, dtype=torch.float64) for kind in kinds}
    counts = torch.zeros(width, dtype=torch.float64)
    chunks = _divergence_chunks(
        student,
        teacher,
        prompts,
        completions,
        pad_id,
        vocab_size,
        kinds,
        None,
        batch_size,
        precomputed,
    )
    for mask, values in chunks:
        n = mask.shape[1]
        counts[:n] += mask.sum(0).double().cpu()
        for kind in kinds:
            sums[kind][:n] += (values[kind] * mask).sum(0).double().cpu()
    out = {kind: (s / counts.clamp(min=1)).tolist() for kind, s in sums.items()}
    out["count"] = [int(c) for c in counts.tolist()]
    return out
