"""Where a micro-batch's sequences come from: `dataset`, `teacher` or `student`.

Each micro-batch comes from the student with probability `source.lmbda` (GKD's lambda) and
otherwise from `source.off_policy`: fixed dataset completions (ground truth, or teacher
text stored offline) or live teacher samples. Everything random is seeded by
(seed, step, micro-batch, rank), so a resumed run draws the same sequences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from opd.config.parse import TrainConfig
from opd.data.batch import SequenceBatch, assemble
from opd.run.metrics import PhaseTimer
from opd.sampling import sample

if TYPE_CHECKING:  # the run that setup assembles; sources only reads it
    from opd.run.setup import RunSetup

SOURCES = ("dataset", "teacher", "student")


def step_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    # rank: each process of a multi-process run samples its own completions (opd.run.world)
    return (seed * 1_000_003 + step * 1_009 + micro + rank * 2**40) % (2**63 - 1)


def choose_source(config: TrainConfig, step: int, micro: int) -> str:
    u = np.random.default_rng([config.seed, step, micro, 7]).random()
    return "student" if u < config.source.lmbda else config.source.off_policy


def micro_batch_rows(run: RunSetup, step: int, micro: int, source: str) -> list[dict]:
    """The dataset rows of this rank's micro-batch `micro` of step `step`, each repeated
    `sampling.n` times when its completions are sampled."""
    config, world = run.config, run.world
    # Global micro-batch `micro` holds micro_batch_size * W prompts; rank r takes slice r.
    start = (step * world.accumulation(config) + micro) * world.size + world.rank
    start *= config.micro_batch_size
    rows = [run.train_rows[i] for i in run.order.take(start, config.micro_batch_size)]
    return rows if source == "dataset" else [r for r in rows for _ in range(config.sampling.n)]


def make_micro_batch(
    run: RunSetup, step: int, micro: int, timer: PhaseTimer, engine=None
) -> SequenceBatch:
    """`engine`: what samples the student (`sample(prompts, ...)` as `VllmSampler`'s), in
    place of `run.rollout_engine`; None: that engine, or the student's HF forward."""
    config, enc, world = run.config, run.encoder, run.world
    engine = engine or run.rollout_engine
    source = choose_source(config, step, micro)
    rows = micro_batch_rows(run, step, micro, source)
    pad = run.tokenizer.pad_token_id
    if source == "dataset":
        # Rows were encoded at start (opd.data.rows.load_run_data); rows from an opd teacher cache
        # carry the exact tokens the teacher scored.
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        return assemble(prompts, completions, pad_id=pad, source="dataset", rows=rows)
    s = config.sampling
    prompts = [enc.row_prompt_ids(r) for r in rows]
    if source == "student" and engine is not None:
        with timer.phase("generate"), torch.no_grad():
            out = engine.sample(
                prompts,
                max_new_tokens=s.max_new_tokens,
                eos_ids=run.encoder.end_ids,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                stop=tuple(s.stop),
                seed=step_seed(config.seed, step, micro, world.rank),
            )
        return assemble(
            prompts,
            out.completions,
            pad_id=pad,
            source=source,
            completion_logprobs=out.logprobs,
            rows=rows,
        )
    model = world.sampling_model(run.student if source == "student" else run.teacher.model)
    gen = torch.Generator(device=run.device)
    gen.manual_seed(step_seed(config.seed, step, micro, world.rank))
    # Sampling trains nothing: with autograd on, an engine's forward would build a graph
    # through every decode step and its KV cache (tests/test_no_grad_phases.py).
    with timer.phase("generate" if source == "student" else "teacher_generate"), torch.no_grad():
        out = sample(
            model,
            prompts,
            engine=run.path.sampler if source == "student" else run.path.other_sampler,
            cuda_graphs=s.cuda_graphs,
            max_new_tokens=s.max_new_tokens,
            eos_id=run.encoder.end_ids,
            pad_id=pad,
            vocab_size=run.vocab_size,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop=tuple(s.stop),
            tokenizer=run.tokenizer,
            generator=gen,
            all_finished=world.lockstep(model),
        )
    return assemble(
        prompts,
        out.completions,
        pad_id=pad,
        source=source,
        completion_logprobs=out.logprobs,
        rows=rows,
    )


def make_micro_batches(
    run: RunSetup, step: int, timer: PhaseTimer, engine=None
) -> list[SequenceBatch]:
    """This rank's micro-batches of optimizer step `step`, each from its drawn source."""
    return [
        make_micro_batch(run, step, m, timer, engine)
        for m in range(run.world.accumulation(run.config))
    ]


def source_weights(batches: list[SequenceBatch]) -> dict[str, float]:
    """Each source's weight in this step's loss: its share of the step's micro-batches.

    GKD's objective is `(1-λ)·E_data[D] + λ·E_student[D]` (Agarwal et al. 2024, eq. 4): λ
    weighs two expectations, it is not a share of tokens. A student micro-batch carries
    `micro_batch_size × sampling.n` sequences and a dataset one `micro_batch_size`; one
    token denominator for both would hand the student ~80% of the gradient at n=4, λ=0.5.
    Here each source's tokens are averaged on their own (`loss_denominators`) and the
    source weighted by its share of micro-batches, whose expectation is λ for the student
    (each micro-batch is the student's with probability λ). Every rank draws the same
    sources (`choose_source` ignores the rank), so the weights agree across ranks."""
    return {s: sum(b.source == s for b in batches) / len(batches) for s in SOURCES}


def loss_denominators(batches: list[SequenceBatch], world) -> dict[str, float]:
    """Per source: what a micro-batch's summed per-token loss is divided by, so that the
    step's loss is `sum_s weight_s · (sum of s's token losses / s's tokens over all ranks
    and micro-batches)`; exact under gradient accumulation and across ranks."""
    weights = source_weights(batches)
    local = [sum(b.num_target_tokens() for b in batches if b.source == s) for s in SOURCES]
    tokens = dict(zip(SOURCES, world.sum_all(local), strict=True))
    return {s: tokens[s] / weights[s] if weights[s] else 0.0 for s in SOURCES}


def source_counts(batches: list[SequenceBatch]) -> dict:
    """JSONL fields: sequences per source and tokens generated by the student and teacher."""
    by_source = {s: sum(b.size for b in batches if b.source == s) for s in SOURCES}
    return {
        "student_tokens_generated": sum(
            b.num_target_tokens() for b in batches if b.source == "student"
        ),
        "teacher_tokens_generated": sum(
            b.num_target_tokens() for b in batches if b.source == "teacher"
        ),
        **{f"sequences_from_{s}": by_source[s] for s in ("student", "teacher", "dataset")},
    }
