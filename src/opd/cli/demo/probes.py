"""What the demo measures on a model: accuracy by length, slips and their corrections.

Every figure is over held-out problems of fixed lengths (`make_eval_sets`); intervals are
95% percentile bootstraps over problems (`bootstrap_ci`), the problems being the unit
that was sampled. Two mechanisms can make a student more accurate on long problems
and they are measured apart:

* slipping less: the per-step error on clean prefixes, `1 - p(right value | clean
  prefix)`, read off one teacher-forced forward pass (the error rate of a sampled step);
* correcting its slips: after a forced slip (a clean prefix whose last value is wrong),
  the probability of writing the correction next; and in the model's own samples,
  P(a step is wrong | the step written before it is wrong).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
import torch

from opd.cli.demo.pretrain import char_ids
from opd.cli.demo.task import (
    LABELS,
    TaskSpec,
    attempts,
    exact_match,
    make_examples,
    running_sums,
    slipped_prefix,
    step_correct,
)
from opd.evaluation.generation import sample_completions


def make_eval_sets(
    spec: TaskSpec, lengths: Sequence[int], per_length: int, seed: int
) -> dict[int, list[dict]]:
    """Held-out problems per length (fewer for short lengths with few distinct problems)."""
    return {n: make_examples(per_length, seed, "eval", spec, steps=n) for n in lengths}


def bootstrap_ci(values: Sequence[float], *, reps: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values` (one value per problem)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, (reps, data.size))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def summarize(per_problem: Sequence[float], seed: int = 0) -> dict:
    return {"mean": float(np.mean(per_problem)), "ci95": bootstrap_ci(per_problem, seed=seed)}


def generate(model, encoder, rows, *, samples: int, temperature: float, seed: int, max_new_tokens):
    """`samples` completions per row (rows repeated in place): (prompt ids, completion ids, texts)."""
    repeated = [r for r in rows for _ in range(samples)]
    prompts, completions = sample_completions(
        model,
        encoder,
        repeated,
        prompt_field="prompt",
        max_new_tokens=max_new_tokens,
        vocab_size=model.config.vocab_size,
        temperature=temperature,
        seed=seed,
        batch_size=512,
    )
    texts = [encoder.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return prompts, completions, texts


def per_problem_mean(scores: Sequence[float], samples: int) -> list[float]:
    return [float(np.mean(scores[i : i + samples])) for i in range(0, len(scores), samples)]


def slip_chain(texts: Sequence[str], rows: Sequence[dict]) -> dict:
    """In the model's own text: P(step wrong | step before wrong) and P(... | before right).

    "Wrong" is against the true count at the step's label, so after an uncorrected slip
    the later steps stay wrong (unless a second slip of the opposite sign cancels it), and
    a written correction is a right step after a wrong one."""
    after_wrong, after_right, corrections = [], [], 0
    for text, row in zip(texts, rows, strict=True):
        truth = running_sums(row["values"])
        # a step past the problem's end (an extra label) is wrong too
        steps = attempts(text)
        wrong = [i >= len(truth) or v != truth[i] for i, v in steps]
        for a, b in itertools.pairwise(wrong):
            (after_wrong if a else after_right).append(b)
        corrections += sum(1 for (i, _), (j, _) in itertools.pairwise(steps) if i == j)
    return {
        "p_wrong_after_wrong": float(np.mean(after_wrong)) if after_wrong else float("nan"),
        "p_wrong_after_right": float(np.mean(after_right)) if after_right else float("nan"),
        "wrong_steps": len(after_wrong),
        "corrections_per_problem": corrections / max(len(texts), 1),
    }


def _forward_logprobs(model, sequences: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Next-token log-probs `[len-1, V]` of each sequence (right-padded batch)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[i, : len(s) - 1] for i, s in enumerate(sequences)]


@torch.no_grad()
def forced_slips(model, tokenizer, rows: Sequence[dict], seed: int) -> dict:
    """Teacher-forced probabilities at one random step of each problem.

    clean_error:     1 - p(right value | clean prefix up to the step's label)
    fix_after_slip:  p(label again, then the right value | the step written wrong)
    carry_on:        p(the next label, i.e. no correction written | the step written wrong);
                     the model may still write the next value right (recomputing)
    Per problem, so that a bootstrap over problems applies."""
    rng = random.Random(seed)
    model.eval()
    clean, slipped, pad = [], [], tokenizer.pad_token_id
    for row in rows:
        i = rng.randrange(len(row["values"]))
        truth = running_sums(row["values"])[i]
        wrong = rng.choice([d for d in range(10) if d != truth])
        prefix = row["prompt"] + slipped_prefix(row, i, wrong)
        clean.append(char_ids(tokenizer, row["prompt"] + row["completion"][: 2 * i + 2]))
        slipped.append(char_ids(tokenizer, prefix + f"{LABELS[i]}{truth}"))
    out = {"clean_error": [], "fix_after_slip": [], "carry_on": []}
    for start in range(0, len(rows), 256):
        lp_clean = _forward_logprobs(model, clean[start : start + 256], pad)
        lp_slip = _forward_logprobs(model, slipped[start : start + 256], pad)
        for k, (c_lp, s_lp) in enumerate(zip(lp_clean, lp_slip, strict=True)):
            c_ids, s_ids = clean[start + k], slipped[start + k]
            out["clean_error"].append(1.0 - float(c_lp[-1, c_ids[-1]].exp()))
            fix = s_lp[-2, s_ids[-2]] + s_lp[-1, s_ids[-1]]
            out["fix_after_slip"].append(float(fix.exp()))
            row = rows[start + k]
            step = (len(c_ids) - len(char_ids(tokenizer, row["prompt"]))) // 2 - 1
            nxt = LABELS[step + 1] if step + 1 < len(row["values"]) else "#"
            out["carry_on"].append(float(s_lp[-2, char_ids(tokenizer, nxt)[0]].exp()))
    return out


def from_corrupted_prefix(
    model, encoder, rows: Sequence[dict], *, seed: int, temperature: float, max_new_tokens: int
) -> list[float]:
    """Answer accuracy when the model continues a clean prefix whose last step is wrong."""
    rng = random.Random(seed + 1)
    starts = []
    for row in rows:
        i = rng.randrange(len(row["values"]))
        truth = running_sums(row["values"])[i]
        head = slipped_prefix(row, i, rng.choice([d for d in range(10) if d != truth]))
        starts.append({**row, "prompt": row["prompt"] + head, "head": head})
    _, _, texts = generate(
        model,
        encoder,
        starts,
        samples=1,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    return [exact_match(r["head"] + t, r) for t, r in zip(texts, starts, strict=True)]


def score_texts(texts: Sequence[str], rows: Sequence[dict], samples: int) -> dict:
    """Per problem: answer accuracy and all-steps-right rate, averaged over its samples."""
    repeated = [r for r in rows for _ in range(samples)]
    answer = [exact_match(t, r) for t, r in zip(texts, repeated, strict=True)]
    all_steps = [float(all(step_correct(t, r))) for t, r in zip(texts, repeated, strict=True)]
    return {
        "answer": per_problem_mean(answer, samples),
        "all_steps": per_problem_mean(all_steps, samples),
    }
