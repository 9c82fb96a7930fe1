"""What the demo measures on one trained model, for one seed (`opd.cli.demo.probes` does the
probing): accuracy by length, slips and corrections, the exposure gap; and the accuracy
curve during training (`CurveProbe`, an `extra_eval` of `opd.train`).

Per-problem values are kept (`*_per_problem`) so that `opd.cli.demo.summary` can pair methods
by seed and problem and put intervals over seeds and problems on every figure.
"""

from __future__ import annotations

import time

from opd.cli.demo import probes
from opd.evaluation.divergence import divergence_by_position

EXPOSURE_KINDS = ("tvd", "reverse_kl", "forward_kl")


class CurveProbe:
    """During training: sampled answer accuracy on a fixed mixed-length set, and the
    training wall seconds so far (the probe's own time left out), for the equal-cost
    comparison."""

    def __init__(self, rows: list[dict], max_new_tokens: int, seed: int):
        self.rows, self.max_new_tokens, self.seed = rows, max_new_tokens, seed
        self.start, self.probing = time.perf_counter(), 0.0

    def __call__(self, run) -> dict:
        t0 = time.perf_counter()
        _, _, texts = probes.generate(
            run.student,
            run.encoder,
            self.rows,
            samples=1,
            temperature=1.0,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
        )
        hits = probes.score_texts(texts, self.rows, 1)["answer"]
        wall = t0 - self.start - self.probing
        self.probing += time.perf_counter() - t0
        return {"eval_sampled_accuracy": sum(hits) / len(hits), "eval_wall_seconds": wall}


def measure(model, encoder, teacher, eval_sets, settings, seed, max_new_tokens, teacher_ref=None):
    """All final figures of one model (`teacher`: a LocalTeacher for the exposure gap).

    `seed` draws the samples and the forced-slip positions; the problems (`eval_sets`) are
    the same for every seed, so per-problem values pair across seeds and methods."""
    tok = encoder.tokenizer
    out: dict = {"seed": seed, "by_length": {}}
    all_rows = [r for rows in eval_sets.values() for r in rows]
    for n, rows in eval_sets.items():
        kw = {"seed": seed + n, "max_new_tokens": max_new_tokens}
        p, c, texts = probes.generate(
            model, encoder, rows, samples=settings.samples, temperature=1.0, **kw
        )
        sampled = probes.score_texts(texts, rows, settings.samples)
        _, _, greedy_texts = probes.generate(model, encoder, rows, samples=1, temperature=0.0, **kw)
        repeated = [r for r in rows for _ in range(settings.samples)]
        out["by_length"][n] = {
            "sampled_per_problem": sampled["answer"],
            "all_steps_per_problem": sampled["all_steps"],
            "greedy_per_problem": probes.score_texts(greedy_texts, rows, 1)["answer"],
            "own_slips": probes.slip_chain(texts, repeated),
        }
        if n == max(eval_sets):
            own = (p, c)
    out["forced"] = probes.forced_slips(model, tok, all_rows, seed)
    for temp in (1.0, 0.0):
        key = "from_corrupted_sampled" if temp else "from_corrupted_greedy"
        out[key] = probes.from_corrupted_prefix(
            model, encoder, all_rows, seed=seed, temperature=temp, max_new_tokens=max_new_tokens
        )
    if teacher is not None and teacher_ref is not None:
        out["exposure"] = exposure_by_step(model, teacher, own, teacher_ref, tok.pad_token_id)
    return out


def exposure_by_step(model, teacher, own, teacher_ref, pad_id) -> dict:
    """Mean divergence per step (summed over the step's two tokens) on the model's own
    samples and on the teacher's, and the gap, for the longest problems."""
    vocab = model.config.vocab_size
    common = {"pad_id": pad_id, "vocab_size": vocab, "kinds": EXPOSURE_KINDS, "batch_size": 512}
    on_own = divergence_by_position(model, teacher, *own, **common)
    on_teacher = divergence_by_position(
        model, teacher, *teacher_ref["samples"], **common, precomputed=teacher_ref["states"]
    )
    out = {}
    for kind in EXPOSURE_KINDS:
        steps = min(len(on_own[kind]), len(on_teacher[kind])) // 2
        own_s = [on_own[kind][2 * j] + on_own[kind][2 * j + 1] for j in range(steps)]
        ref_s = [on_teacher[kind][2 * j] + on_teacher[kind][2 * j + 1] for j in range(steps)]
        out[kind] = {
            "on_own": own_s,
            "on_teacher": ref_s,
            "gap": [a - b for a, b in zip(own_s, ref_s, strict=True)],
        }
    return out
