"""Task accuracy of generations, and the exposure-bias gap.

Exposure-bias gap (ours): the student's mean per-token divergence to the teacher on
prefixes the student sampled itself, minus the same on prefixes the teacher sampled,
`E_{y~p_S}[D(y|x)] - E_{y~p_T}[D(y|x)]`. Offline KD trains only on the second kind of
state; a large gap is the cost of never seeing one's own mistakes.
"""

from __future__ import annotations

import torch

from opd.batch import assemble
from opd.data import Encoder
from opd.losses import masked_sum, token_divergence
from opd.models import completion_logits
from opd.rollout import sample
from opd.teachers.local import LocalTeacher


def generate_texts(
    model,
    encoder: Encoder,
    rows: list[dict],
    *,
    prompt_field: str,
    max_new_tokens: int,
    vocab_size: int,
    temperature: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    all_finished=None,
) -> tuple[list[str], int]:
    """Completions as text (EOS stripped), and the number of tokens generated."""
    tok = encoder.tokenizer
    texts, generated = [], 0
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encoder.prompt_ids(r[prompt_field]) for r in chunk]
        out = sample(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            vocab_size=vocab_size,
            temperature=temperature,
            generator=gen,
            all_finished=all_finished,
        )
        generated += sum(len(c) for c in out.completions)
        texts += [tok.decode(c, skip_special_tokens=True) for c in out.completions]
    return texts, generated


def task_accuracy(
    model,
    encoder,
    rows,
    metric,
    *,
    prompt_field,
    max_new_tokens,
    vocab_size,
    temperature=0.0,
    seed=0,
    all_finished=None,
) -> float:
    if not rows:
        return float("nan")
    texts, _ = generate_texts(
        model,
        encoder,
        rows,
        prompt_field=prompt_field,
        max_new_tokens=max_new_tokens,
        vocab_size=vocab_size,
        temperature=temperature,
        seed=seed,
        all_finished=all_finished,
    )
    return sum(metric(t, r) for t, r in zip(texts, rows, strict=True)) / len(rows)


@torch.no_grad()
def divergence_on_samples(
    student,
    teacher: LocalTeacher,
    sampler,
    encoder: Encoder,
    rows: list[dict],
    *,
    prompt_field: str,
    max_new_tokens: int,
    vocab_size: int,
    kind: str = "reverse_kl",
    beta: float | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Mean per-token D(student || teacher kind) on completions sampled by `sampler`."""
    tok = encoder.tokenizer
    device = next(student.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    student_was_training = student.training
    student.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encoder.prompt_ids(r[prompt_field]) for r in chunk]
        out = sample(
            sampler,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            vocab_size=vocab_size,
            temperature=temperature,
            generator=gen,
        )
        batch = assemble(prompts, out.completions, pad_id=tok.pad_token_id).to(device)
        s_logits = completion_logits(student, batch, vocab_size)
        t_logits = teacher.score(batch, "logits").logits.to(device)
        values = token_divergence(s_logits, t_logits, kind, beta=beta)
        mask = batch.loss_mask()
        total += float(masked_sum(values, mask))
        count += int(mask.sum())
    student.train(student_was_training)
    return total / max(count, 1)


def exposure_bias(student, teacher: LocalTeacher, encoder, rows, **kw) -> dict[str, float]:
    """Divergence on student prefixes, on teacher prefixes, and their difference (the gap)."""
    on_student = divergence_on_samples(student, teacher, student, encoder, rows, **kw)
    on_teacher = divergence_on_samples(student, teacher, teacher.model, encoder, rows, **kw)
    return {
        "div_on_student": on_student,
        "div_on_teacher": on_teacher,
        "exposure_gap": on_student - on_teacher,
    }
