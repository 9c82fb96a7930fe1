"""The one loop (`opd.train`): pick sequences -> teacher scores them -> loss -> update.

    opd train examples/on_policy.yaml steps=200 loss.divergence=reverse_kl
    python -c "import opd; opd.train(opd.load_config('cfg.yaml'))"

Each optimizer step draws `batch_size / micro_batch_size` micro-batches. Each micro-batch
comes from the student with probability `source.lmbda` (GKD's lambda) and otherwise from
`source.off_policy` (fixed dataset completions or live teacher samples). All micro-batches
are assembled first so the loss can be normalized by the step's total token count; then
each is scored by the teacher and back-propagated in turn (one set of teacher logits in
memory at a time). Everything random in a step is seeded by (seed, step, micro-batch), so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from opd.config.parse import TrainConfig, config_to_dict
from opd.evaluation.generation import task_accuracy
from opd.evaluation.rewards import resolve_metric
from opd.objectives import for_step
from opd.run.checkpoint import (
    TrainingStopped,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    set_rng_state,
    weights_finite,
)
from opd.run.heap import release_freed_heap
from opd.run.interrupt import Interrupted, StopFlag
from opd.run.lock import hold_run_dir, is_main_process, release_run_dir
from opd.run.metrics import MetricsLog, PhaseTimer
from opd.run.path import RunPath
from opd.run.precision import autocast
from opd.run.progress import Progress
from opd.run.rollouts import Rollouts, sampler_token_stats
from opd.run.score_ahead import ScoreAhead, overlaps
from opd.run.setup import RunSetup, build_run
from opd.run.sources import SOURCES, loss_denominators, source_counts, source_weights
from opd.run.state import RunState
from opd.run.world import NullMetricsLog, aggregate_step

log = logging.getLogger("opd")


def train_step(run: RunSetup, step: int, timer: PhaseTimer) -> dict:
    """One optimizer step: make micro-batches -> teacher scores -> loss -> step.

    The batches come from `run.rollouts` (`opd.run.rollouts`: drawn now, or ahead by
    `rollouts.mode`), which also takes the new weights to the sampler."""
    world = run.world
    rollouts = run.rollouts or Rollouts(run)
    batches = rollouts.batches_for(step, timer)
    # Summed over ranks before any backward: every rank divides by the step's global counts,
    # each source by its own (GKD's λ weighs sources, not tokens: `sources.source_weights`).
    denominators = loss_denominators(batches, world)
    num_tokens = world.sum(sum(b.num_target_tokens() for b in batches))
    objectives = for_step(run)
    loss_total, div_total, teacher_scored = 0.0, 0.0, 0
    loss_by_source = dict.fromkeys(SOURCES, 0.0)
    # train-inference mismatch of vLLM samples, and the ratios p/q of stale ones
    measure = run.rollout_engine is not None or rollouts.mode != "off"
    sampler = [0.0, 0.0, 0.0, 0, 0]  # sampler_token_stats: gap, ratio sum, max, out, tokens
    if not run.student.training:  # a transformers model's train() costs ~1 ms: only if needed
        run.student.train()
    # on the device; with overlap, micro-batch i+1 is scored while i is back-propagated
    scorer = ScoreAhead(objectives, batches, run.device, overlaps(run.config, run.teacher))
    for i, batch in enumerate(scorer):
        if measure and batch.source == "student" and batch.sampler_logprobs is not None:
            with timer.phase("sampler_gap"):  # one extra no-grad forward (as TRL's IS check)
                stats = sampler_token_stats(
                    world.unwrap(run.student), batch, run.config, run.vocab_size
                )
            top = max(sampler[2], stats[2])
            sampler = [a + b for a, b in zip(sampler, stats, strict=True)]
            sampler[2] = top
        objective = objectives.for_batch(batch)
        with timer.phase("teacher_score"), torch.no_grad():  # whatever the teacher: no graph
            scored = scorer.scored(i)
        teacher_scored += scored.tokens_scored
        last = i == len(batches) - 1
        precise = autocast(run.config, run.device)
        with timer.phase("update"), precise, world.grad_sync(run.student, last):
            loss, div_sum = objective.loss(batch, scored, denominators[batch.source])
            world.backward(loss if run.scaler is None else run.scaler.scale(loss))
        loss_total += float(loss.detach())
        loss_by_source[batch.source] += float(loss.detach())
        div_total += div_sum
        # This micro-batch's teacher scores (full [B, L, V] logits on the plain path) go
        # before the next is scored: one set in memory at a time (under teacher.overlap a
        # remote teacher's next, top-k or token log-probs only, may already be on its way).
        del scored, loss
    ratio_max = world.max_all([sampler[2]])[0] if measure else 0.0
    loss_total, div_total, gap_sum, ratio_sum, ratio_out, gap_tokens, *by_source = world.sum_all(
        [loss_total, div_total, sampler[0], sampler[1], *sampler[3:], *loss_by_source.values()]
    )
    with timer.phase("update"):
        grad_norm, finite = optimizer_step(run, loss_total)
    # fp16: gradients that overflowed at this loss scale (a finite loss) are the scaler's
    # business: it skipped the update and lowered the scale; not a bad step.
    overflow = run.scaler is not None and math.isfinite(loss_total) and not finite
    scale = {} if run.scaler is None else {"loss_scale": run.scaler.get_scale()}
    # the next rollouts must come from these weights (timed only where there is a sampler
    # engine to push to: the metrics then show `time_weight_sync` exactly for runs that push)
    pushing = timer.phase("weight_sync") if rollouts.engine is not None else nullcontext()
    with pushing:
        rollouts.after_update(finite)
    ratios = {}
    if gap_tokens and rollouts.mode != "off":
        ratios = {
            "ratio_mean": ratio_sum / gap_tokens,
            "ratio_max": ratio_max,
            "ratio_out_of_bounds": ratio_out / gap_tokens,
        }
    return aggregate_step(
        world,
        {
            "loss": loss_total,
            "divergence": div_total / max(num_tokens, 1),
            "grad_norm": grad_norm,
            "skipped": not finite,
            **({"scale_overflow": True} if overflow else {}),
            **scale,
            "tokens": num_tokens,
            **source_counts(batches),
            # Each source's weight in the loss (its share of the gradient's terms) and the
            # weighted term it contributed: loss = sum of the loss_from_* terms.
            **{f"weight_{s}": w for s, w in source_weights(batches).items()},
            **{f"loss_from_{s}": v for s, v in zip(SOURCES, by_source, strict=True)},
            "teacher_tokens_scored": teacher_scored,
            # failovers of replicas; per teacher of several: rows, tokens, divergence, seconds
            **(run.teacher.step_record(world.sum_all) if hasattr(run.teacher, "step_record") else {}),
            "lr": run.scheduler.get_last_lr()[0],
            **objectives.record(),
            # mean |log p_S - log q| over vLLM-sampled tokens (absent without such tokens)
            **({"sampler_logprob_gap": gap_sum / gap_tokens} if gap_tokens else {}),
            **ratios,  # p_theta/q of the sampled tokens, with stale rollouts
        },
    )


def optimizer_step(run: RunSetup, loss_total: float) -> tuple[float, bool]:
    """Clip, then step only when the loss and gradient are finite; `(grad_norm, finite)`."""
    params = [p for p in run.student.parameters() if p.requires_grad]
    max_norm = run.config.optim.max_grad_norm or float("inf")
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)  # clip the true gradients; records any overflow
    grad_norm = run.world.clip_grad_norm(run.student, params, max_norm)
    finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
    if finite and not run.optimizer.state:
        release_freed_heap()  # before the optimizer's state exists (opd.run.heap says why)
    if run.scaler is not None:
        if finite:
            run.scaler.step(run.optimizer)  # finite gradients: steps
        run.scaler.update()  # halves the scale after an overflow, grows it after a clean run
    if finite:
        if run.scaler is None:
            run.optimizer.step()
        run.scheduler.step()
        if hasattr(run.teacher, "after_optimizer_step"):
            run.teacher.after_optimizer_step()  # self teacher, EMA weights
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def evaluate_now(run: RunSetup, metric) -> dict:
    if not run.eval_rows:
        return {}
    with torch.no_grad():  # evaluation trains nothing
        return {"eval_accuracy": _task_accuracy(run, metric)}


def _task_accuracy(run: RunSetup, metric) -> float:
    return task_accuracy(
        run.world.sampling_model(run.student),
        run.encoder,
        run.eval_rows,
        metric,
        max_new_tokens=run.config.sampling.max_new_tokens,
        vocab_size=run.vocab_size,
        seed=run.config.seed,
        all_finished=run.world.lockstep(run.student),
        engine=run.path.other_sampler,  # a colocated vLLM engine serves training rollouts only
    )


def _save(run: RunSetup, step: int, state: RunState):
    world = run.world  # gathers run on every rank (FSDP); rank 0 alone writes
    if world.sum(0 if weights_finite(run.student) else 1):
        # e.g. a finite loss whose update overflowed: such weights are never checkpointed,
        # so `latest` keeps pointing at the last finite state.
        last = latest_checkpoint(run.config.output_dir)
        raise TrainingStopped(
            f"the student's weights are non-finite after step {step} (an update overflowed: "
            f"optim.lr={run.config.optim.lr:g} too high?); they were not saved. "
            + (
                f"The last finite checkpoint is {last}: resume from it with resume=true, "
                "changing optim.lr with resume_allow_changes=[optim.lr]"
                if last is not None
                else "The run has no checkpoint to resume from; start again with a lower optim.lr"
            )
        )
    model_state = world.model_state(run.student)
    optimizer_state = world.optimizer_state(run.student, run.optimizer)
    rollouts_state = run.rollouts.state() if run.rollouts else {}  # every rank's, gathered
    if not world.is_main:
        world.barrier()
        return latest_checkpoint(run.config.output_dir)
    path = save_checkpoint(
        run.config.output_dir,
        step,
        world.unwrap(run.student),
        run.tokenizer,
        {
            "optimizer": optimizer_state,
            "scheduler": run.scheduler.state_dict(),
            "data_position": step * run.config.batch_size,
            **state.checkpoint_fields(),
            "teacher_state": getattr(run.teacher, "checkpoint_state", dict)(),
            "rollouts": rollouts_state,  # batches drawn ahead of the steps (pipelined)
            **({"scaler": run.scaler.state_dict()} if run.scaler is not None else {}),
        },
        config_to_dict(run.config),
        keep=run.config.keep_checkpoints,
        model_state=model_state,
    )
    world.barrier()
    return path


def _apply_optim_config(run: RunSetup, config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer and schedule: the config's lr and weight decay
    (different only when a resume allows it, `resume_allow_changes=[optim.lr]`)."""
    lr, decay, sched = config.optim.lr, config.optim.weight_decay, run.scheduler
    groups = run.optimizer.param_groups
    if sched.base_lrs == [lr] * len(groups) and all(g["weight_decay"] == decay for g in groups):
        return  # untouched, so the resumed run stays bit-identical
    sched.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, sched.lr_lambdas, strict=True):
        group.update(initial_lr=lr, lr=lr * factor(sched.last_epoch), weight_decay=decay)
    sched._last_lr = [g["lr"] for g in groups]
    log.info("resumed with optim.lr=%g, optim.weight_decay=%g from the config", lr, decay)


def train(config: TrainConfig, run: RunSetup | None = None, extra_eval=None) -> dict:
    """Run (or resume) training; returns the last logged record plus the run directory.

    `extra_eval(run) -> dict`, if given, runs at every evaluation point (and before the
    first step, logged as step 0) and its values join the JSONL record: the demo uses it
    for sampled accuracy and the exposure-bias gap. The run directory is locked for the
    whole run (`opd.run.lock`): another process writing it is refused at once.
    """
    main = is_main_process()
    if main:
        hold_run_dir(config.output_dir, "opd train")  # taken already if preflight ran
    try:
        return _train(config, run, extra_eval)
    finally:
        if main:
            release_run_dir(config.output_dir)


def _train(config: TrainConfig, run: RunSetup | None, extra_eval) -> dict:
    run = run or build_run(config)
    config = run.config  # with the values preflight derived (e.g. loss.topk from a cache)
    if run.world.is_main:
        write_run_config(config)
        write_run_path(config, run.path)
        log.info("path: %s", run.path.describe())
    if (config.bf16 or config.fp16) and run.device.type != "cuda":
        # CPU autocast to 16 bits is emulated, and slow, on CPUs without such instructions; a
        # bf16 teacher on CPU is `teacher.dtype: bfloat16`.
        log.warning(
            "%s: true applies autocast on CUDA only; computing in float32 on %s",
            "bf16" if config.bf16 else "fp16",
            run.device,
        )
    state = RunState()
    rollouts = run.rollouts = Rollouts(run)
    if run.resume_from is not None:
        saved = load_trainer_state(run.resume_from)
        run.world.load_optimizer_state(run.student, run.optimizer, saved["optimizer"])
        run.scheduler.load_state_dict(saved["scheduler"])
        _apply_optim_config(run, config)
        set_rng_state(saved["rng"])
        state = RunState.from_trainer_state(saved)
        if hasattr(run.teacher, "load_checkpoint_state"):
            run.teacher.load_checkpoint_state(saved.get("teacher_state", {}))
        rollouts.load_state(saved.get("rollouts", {}))
        if run.scaler is not None and "scaler" in saved:
            run.scaler.load_state_dict(saved["scaler"])
        log.info("resumed from %s at step %d", run.resume_from, state.step)
    start_step = state.step
    metrics = (
        MetricsLog(
            config.output_dir,
            resume_step=start_step if run.resume_from else None,
            report_to=tuple(config.report_to),
            config={**config_to_dict(config), "run_path": run.path.as_dict()},
        )
        if run.world.is_main
        else NullMetricsLog()
    )
    metric_fn = resolve_metric(
        config.eval_metric, config.data.answer_field, pattern=config.eval_pattern
    )
    timer, record = PhaseTimer(), {}
    if config.eval_every and start_step == 0:
        metrics.write(
            {"step": 0, **evaluate_now(run, metric_fn), **(extra_eval(run) if extra_eval else {})}
        )
    progress = Progress(
        config.steps,
        start_step,
        log_every=config.log_every,
        enabled=run.world.is_main,
        divergence_name="ce" if config.loss.objective == "ce" else "div",
    )
    stop = StopFlag().install()  # Ctrl-C / SIGTERM: finish the step, save, raise Interrupted
    rollouts.start(start_step)
    try:
        for step in range(start_step, config.steps):
            t0 = time.perf_counter()
            record = {"step": step + 1, **train_step(run, step, timer)}
            if rollouts.mode != "off":
                record.update(rollouts.record(time.perf_counter() - t0))
            state.count_skip(record)
            if record.get("scale_overflow"):
                log.info(
                    "step %d: fp16 gradients overflowed; update skipped, loss scale now %g",
                    step + 1,
                    record["loss_scale"],
                )
            elif record["skipped"]:
                log.warning("step %d: non-finite loss or gradient; update skipped", step + 1)
                if state.bad_steps >= config.max_bad_steps:
                    path = _save(run, step + 1, state)
                    raise TrainingStopped(
                        f"{state.bad_steps} consecutive non-finite steps; stopped. The weights "
                        f"were not updated by them; last good state saved in {path}"
                    )
            seconds = {f"time_{k}": v for k, v in timer.pop().items()}
            record.update(seconds, time_step=time.perf_counter() - t0)
            state.add_totals(record, seconds)
            done = step + 1 == config.steps
            if config.eval_every and ((step + 1) % config.eval_every == 0 or done):
                record.update(evaluate_now(run, metric_fn))
                if extra_eval is not None:
                    record.update(extra_eval(run))
            if (step + 1) % config.log_every == 0 or done or "eval_accuracy" in record:
                metrics.write(record)
            progress.update(record)
            saved = (config.save_every and (step + 1) % config.save_every == 0) or done
            if saved:
                _save(run, step + 1, state)
            # Ranks may get the signal at different steps (or one alone: a scheduler's
            # SIGTERM, a Ctrl-C straddling a step's end), and saving runs collectives: every
            # rank stops at the step where any rank asked, with that signal (one all-reduce).
            signum = int(run.world.max_all([stop.signum or 0])[0])
            if signum and not done:
                path = latest_checkpoint(config.output_dir) if saved else None
                path = path or _save(run, step + 1, state)
                raise Interrupted(signum, step + 1, path)
    finally:
        rollouts.close()
        stop.restore()
        progress.close()
        metrics.close()
    return {**record, "output_dir": config.output_dir, "totals": state.totals}


def write_run_config(config: TrainConfig) -> None:
    """`output_dir/config.yaml`: the resolved config (preset, file, overrides, derived values)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    os.replace(tmp, out / "config.yaml")


def write_run_path(config: TrainConfig, path: RunPath) -> None:
    """`output_dir/run_path.json`: which objective, sampler and teacher path the run took."""
    out = Path(config.output_dir)
    tmp = out / f".run_path.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(path.as_dict(), indent=1) + "\n")
    os.replace(tmp, out / "run_path.json")
