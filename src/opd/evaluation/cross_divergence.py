"""The exposure-bias probe with a teacher of another tokenizer (`opd eval`).

The same-tokenizer probe (`divergence.exposure_bias`) compares two next-token
distributions over one vocabulary at every completion position. Across tokenizers two
such distributions describe the same event only where one student token and one teacher
token cover the same bytes after the same prefix (a one-to-one span). There the teacher's
distribution is mapped into the student's vocabulary by token bytes, as kd trains across
tokenizers (`opd.teachers.cross_tokenizer.vocab_map`: byte collisions merged, teacher
tokens the student lacks in one tail bucket): the per-kind figures are means over those
positions only, approximate where the vocabularies differ.

The exact figure (`sequence`): per row the log-ratio of the same text, summed over its
aligned spans (by the chain rule span log-probs compare exactly), per aligned student
token. On the student's own samples it estimates KL(S||T) per token without bias
(log p_S(y) - log p_T(y), y ~ p_S); on the teacher's samples KL(T||S) (log p_T - log p_S,
y ~ p_T): two directions, so no gap is formed from them.

The teacher samples in its own tokens from its own rendering of each row (as it is used);
its completions are re-tokenized for the student from their bytes, as a cache in the
teacher's tokens is (`cross_tokenizer.cache.retokenize_cache_rows`), and aligned to the
teacher's own ids. Where the bytes do not round-trip the rest of a row is left out,
counted in `alignment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd.data.batch import assemble
from opd.evaluation.divergence import Rows
from opd.evaluation.generation import sample_completions
from opd.losses import sparse_token_divergence
from opd.modeling.hf import completion_hidden, completion_logits, supports_fused_head
from opd.teachers.cross_tokenizer.cache import retokenize_cache_rows
from opd.teachers.cross_tokenizer.grid import span_grids, student_grid_scores
from opd.teachers.local import LocalTeacher

BASIS = (
    "teacher with another tokenizer: per-kind divergences are means over one-to-one "
    "positions (one student token and one teacher token covering the same bytes after the "
    "same prefix; alignment.*.one_to_one_frac of the completion tokens), the teacher's "
    "distribution mapped into the student's vocabulary by token bytes with unmapped mass in "
    "one tail bucket: approximate where the vocabularies differ. sequence: exact span "
    "log-ratios per aligned student token, KL(S||T) on the student's samples and KL(T||S) "
    "on the teacher's"
)


def _rows_at(model, batch, vocab_size: int, b_idx, p_idx) -> Rows:
    """`model`'s hidden states (or logits) at completion cells `(b_idx, p_idx)`."""
    if supports_fused_head(model):
        hidden = completion_hidden(model, batch)[b_idx, p_idx]
        return Rows(hidden, model.get_output_embeddings())
    return Rows(completion_logits(model, batch, vocab_size)[b_idx, p_idx])


@torch.no_grad()
def cross_divergences(
    student,
    cross,
    samples: Sequence[tuple[list[int], list[int], dict]],
    *,
    pad_id: int,
    vocab_size: int,
    kinds: Sequence[str],
    batch_size: int = 16,
) -> dict:
    """On `(student prompt ids, student completion ids, row)` samples: the mean mapped
    divergence per kind at one-to-one positions, the summed span log-ratio
    log p_S - log p_T per aligned student token, and how much aligned (module doc).
    `cross`: a `CrossTokenizerTeacher` over a local teacher."""
    device = next(student.parameters()).device
    t_model, t_vocab = cross.inner.model, cross.inner.vocab_size
    t_device = next(t_model.parameters()).device
    student_scorer = LocalTeacher(student, vocab_size)  # log p_S of the sampled tokens
    totals = dict.fromkeys(kinds, 0.0)
    n = {"tokens": 0, "one_to_one": 0, "aligned": 0, "rows_cut": 0}
    log_ratio = 0.0
    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            batch = assemble(
                [p for p, _, _ in part], [c for _, c, _ in part], pad_id=pad_id,
                rows=[r for _, _, r in part],
            ).to(device)  # fmt: skip
            tbatch, aligned_rows = cross.teacher_batch(batch)
            tbatch = tbatch.to(t_device)
            B, L = batch.size, batch.completion_width
            Lt = max([len(r.teacher_ids) for r in aligned_rows] + [1])
            _, _, (pb, ps, pt) = span_grids(aligned_rows, B, L, Lt)
            mine = _rows_at(student, batch, vocab_size, torch.tensor(pb), torch.tensor(ps))
            theirs = _rows_at(t_model, tbatch, t_vocab, torch.tensor(pb), torch.tensor(pt))
            ids = cross.vocab.student_ids.to(device)
            for s_logits, t_logits in zip(
                mine.logits(vocab_size, device), theirs.logits(t_vocab, device), strict=True
            ):
                mapped = cross.vocab.full(torch.log_softmax(t_logits.float(), dim=-1))
                top = ids.expand(mapped.shape[0], -1)
                for kind in kinds:
                    value = sparse_token_divergence(s_logits.float(), top, mapped, kind)
                    totals[kind] += float(value.sum())
            # the exact figure: span log-probs on the student's grid
            t_scores = cross.inner.score(tbatch, "token")
            grid = student_grid_scores(aligned_rows, L, t_scores, "token", cross.vocab)
            s_lp = student_scorer.score(batch, "token").token_logprobs
            scored = grid.aligned.to(device) & batch.loss_mask()
            diff = s_lp.double() - grid.token_logprobs.to(device).double()
            log_ratio += float(torch.where(scored, diff, 0.0).sum())
            n["tokens"] += int(batch.loss_mask().sum())
            n["one_to_one"] += len(pb)
            n["aligned"] += int(scored.sum())
            n["rows_cut"] += sum(r.cut is not None for r in aligned_rows)
    finally:
        student.train(was_training)
    return {
        "mapped": {k: v / max(n["one_to_one"], 1) for k, v in totals.items()},
        "log_ratio": log_ratio / max(n["aligned"], 1),
        "one_to_one_frac": n["one_to_one"] / max(n["tokens"], 1),
        "aligned_frac": n["aligned"] / max(n["tokens"], 1),
        "rows_cut": n["rows_cut"],
        "rows": len(samples),
    }


def teacher_samples_for_student(
    t_model, t_encoder, s_encoder, rows: list[dict], **sampling
) -> list[tuple[list[int], list[int], dict]]:
    """The teacher's samples (its tokens, its own rendering of each row) as student
    sequences with the teacher's ids kept for alignment (module doc); rows whose student
    prompt cannot be fitted are left out."""
    t_prompts, t_comps = sample_completions(t_model, t_encoder, rows, **sampling)
    stored = [
        {**row, "prompt_ids": p, "completion_ids": c}
        for row, p, c in zip(rows, t_prompts, t_comps, strict=True)
    ]
    out = retokenize_cache_rows(stored, s_encoder, t_encoder.tokenizer, t_encoder.end_ids)
    return [(r["prompt_ids"], r["completion_ids"], r) for r in out]


def cross_exposure_bias(
    student,
    cross,
    rows: list[dict],
    *,
    s_encoder,
    sampling: dict,
    vocab_size: int,
    kinds: Sequence[str] = ("reverse_kl",),
) -> dict:
    """`opd eval`'s divergence to a teacher of another tokenizer: per kind the mapped
    divergence on the student's samples, on the teacher's, and the gap; `sequence` the
    exact span log-ratios; `alignment` what the figures cover; `basis` which they are.
    `sampling`: `sample_completions` keywords (max_new_tokens, temperature, seed)."""
    s_prompts, s_comps = sample_completions(
        student, s_encoder, rows, vocab_size=vocab_size, **sampling
    )
    own = list(zip(s_prompts, s_comps, rows, strict=True))
    t_model = cross.inner.model
    theirs = teacher_samples_for_student(
        t_model, cross.t_encoder, s_encoder, rows, vocab_size=cross.inner.vocab_size, **sampling
    )
    common = {"pad_id": s_encoder.tokenizer.pad_token_id, "vocab_size": vocab_size, "kinds": kinds}
    on_s = cross_divergences(student, cross, own, **common)
    on_t = cross_divergences(student, cross, theirs, **common)
    out: dict = {
        kind: {
            "div_on_student": on_s["mapped"][kind],
            "div_on_teacher": on_t["mapped"][kind],
            "exposure_gap": on_s["mapped"][kind] - on_t["mapped"][kind],
        }
        for kind in kinds
    }
    out["sequence"] = {
        "reverse_kl_on_student": on_s["log_ratio"],
        "forward_kl_on_teacher": -on_t["log_ratio"],
    }
    keys = ("one_to_one_frac", "aligned_frac", "rows_cut", "rows")
    out["alignment"] = {
        "on_student": {k: on_s[k] for k in keys},
        "on_teacher": {k: on_t[k] for k in keys},
    }
    out["basis"] = BASIS
    return out
