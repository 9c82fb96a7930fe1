"""Sampling completions for evaluation and task accuracy of the generated texts."""

from __future__ import annotations

import torch

from opd.data.rows import Encoder
from opd.sampling import sample


@torch.no_grad()  # evaluation samples train nothing
def sample_completions(
    model,
    encoder: Encoder,
    rows: list[dict],
    *,
    max_new_tokens: int,
    prompt_field: str | None = None,
    vocab_size: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    all_finished=None,
    engine: str = "hf",
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) for every row, sampled in chunks from one seeded generator
    with the sampling `engine` (`opd.sampling.sample`).

    Prompts: each row's `prompt_ids` (rows encoded by `opd.data.rows.load_run_data`) or its prompt
    encoded; `prompt_field` names another column to encode instead."""
    tok = encoder.tokenizer
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts_all, completions = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if prompt_field is None:
            prompts = [encoder.row_prompt_ids(r) for r in chunk]
        else:
            prompts = [encoder.prompt_ids(r[prompt_field]) for r in chunk]
        out = sample(
            model,
            prompts,
            engine=engine,
            max_new_tokens=max_new_tokens,
            eos_id=encoder.end_ids,
            pad_id=tok.pad_token_id,
            vocab_size=vocab_size,
            temperature=temperature,
            generator=gen,
            all_finished=all_finished,
        )
        prompts_all += prompts
        completions += out.completions
    return prompts_all, completions


def generate_texts(model, encoder: Encoder, rows: list[dict], **kw) -> tuple[list[str], int]:
    """Completions as text (EOS stripped), and the number of tokens generated.

    Keywords as `sample_completions`, except that `temperature` defaults to 0 (greedy)."""
    kw.setdefault("temperature", 0.0)
    _, completions = sample_completions(model, encoder, rows, **kw)
    tok = encoder.tokenizer
    texts = [tok.decode(c, skip_special_tokens=True) for c in completions]
    return texts, sum(len(c) for c in completions)


def task_accuracy(model, encoder, rows, metric, **kw) -> float:
    """Mean of `metric(text, row)` over the rows (NaN for none); keywords as `generate_texts`."""
    if not rows:
        return float("nan")
    texts, _ = generate_texts(model, encoder, rows, **kw)
    return sum(metric(t, r) for t, r in zip(texts, rows, strict=True)) / len(rows)
