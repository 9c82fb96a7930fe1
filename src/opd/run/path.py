"""Which path a run takes, decided once from the config and the loaded models.

Every place that would otherwise branch on a kind or an engine asks this decision instead:
the objective implementation (`opd.objectives.for_step`), the student's sampler and the
sampler of teacher samples and evaluation (`opd.run.sources`, `opd.run.loop`), whether a
colocated vLLM engine is built (`opd.run.setup`), and what the teacher is asked. The run logs
`RunPath.describe()` in one line at start and writes `run_path.json` beside `config.yaml`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from opd.config.checks import teacher_need, uses_teacher
from opd.config.parse import LossConfig, TrainConfig
from opd.modeling.lean_check import lean_applies
from opd.objectives.fused import why_not_fused

ObjectivePath = Literal["fused_full", "fused_tokens", "plain"]


@dataclass(frozen=True)
class RunPath:
    """The decision. Attributes:
        objective: the distillation objective's implementation: `fused_full` (full-vocabulary
            kd from both models' hidden states), `fused_tokens` (ce, pg or top-k kd from the
            student's hidden states), `plain` (from full `[tokens, vocab]` logits).
        objective_why: why that implementation (the reason when the fused head is not taken).
        rewarded: the implementation of the RL + distillation term on student batches (the
            distillation objective's, with the reward term added), or None.
        sampler: the engine that samples the student (`hf`, `lean`, `vllm`: colocated engine,
            `vllm_server`: separate vLLM servers).
        other_sampler: the engine of teacher samples and evaluation (vLLM holds the student's
            rollouts only, so those take the HF forward under `sampler=vllm*`).
        decoders: which forward `auto` / `lean` run (`sampling.engine`, `loss.fused_forward`):
            `lean` for the models `opd.modeling.lean` supports (checked against hf on their
            first batch; under `auto` a failed check is logged and hf runs), else `hf`.
        rollouts: when student rollouts are drawn (`off`, `pipelined lag k`, `queue
            max_staleness s`: opd.run.rollouts).
        teacher: what scores (`none`, `local`, `self (frozen)`, `remote <url>`, `remote, N
            replicas (...)`, `cached <dir>`, `vllm`, `N teachers by ...`).
        teacher_need: what the teacher returns (`token`, `topk`, `logits`, or None) and its k.
    """

    objective: ObjectivePath
    objective_why: str
    rewarded: str | None
    sampler: str
    other_sampler: str
    teacher: str
    teacher_need: tuple[str | None, int]
    rollouts: str = "off"
    decoders: str = ""

    @property
    def fused(self) -> bool:
        return self.objective != "plain"

    def describe(self) -> str:
        need, k = self.teacher_need
        asked = {"token": "sampled-token log-probs", "topk": f"top-{k} log-probs",
                 "logits": "full logits", None: "nothing"}[need]
        obj = {"fused_full": "fused full-vocabulary kd from hidden states",
               "fused_tokens": "fused (ce / pg / top-k) from the student's hidden states",
               "plain": "plain, from full logits"}[self.objective]
        parts = [f"objective: {obj} ({self.objective_why})"]
        if self.rewarded:
            parts.append(f"RL term on student batches: {self.rewarded}")
        sampler = "vllm colocated" if self.sampler == "vllm" else self.sampler
        parts.append(f"sampler: {sampler} (teacher samples and eval: {self.other_sampler})")
        if self.decoders:
            parts.append(f"decoders: {self.decoders}")
        parts.append(f"teacher: {self.teacher}, asked for {asked}")
        if self.rollouts != "off":
            parts.append(f"rollouts: {self.rollouts}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["teacher_need"] = list(self.teacher_need)
        return out


def describe_teacher(config: TrainConfig) -> str:
    t = config.teacher
    if not uses_teacher(config):
        return "none"
    if t.kind == "remote":
        n, urls = len(t.servers), ", ".join(t.servers)
        return f"remote {urls}" if n == 1 else f"remote, {n} replicas ({urls})"
    if t.kind == "routed":
        routing = config.routing
        by = f"by column {routing.key}" if routing.key else "by fixed mix"
        names = ", ".join(f"{n} ({one.kind})" for n, one in config.teachers.items())
        return f"{len(config.teachers)} teachers {by}: {names}"
    if t.kind == "cached":
        return f"cached {t.cache_dir or config.data.train}"
    if t.kind == "self":
        return f"self ({t.self_weights} weights)"
    return t.kind


def objective_path(loss: LossConfig, *, distributed: bool, student, teacher) -> tuple[str, str]:
    """`(implementation, why)` of the distillation objective for these models."""
    # Under DDP/FSDP the fused objectives run as the wrapper's forward
    # (opd.modeling.wrapped.as_forward), so gradients sync and sharded weights are gathered.
    blocker = why_not_fused(loss, student, teacher, distributed) if loss.fused else None
    if not loss.fused:
        objective, why = "plain", "loss.fused=false"
    elif blocker is not None:
        objective, why = "plain", f"the fused head does not apply: {blocker}"
    elif loss.objective == "kd" and loss.estimator == "full":
        objective, why = "fused_full", "loss.fused=true"
    else:
        objective, why = "fused_tokens", "loss.fused=true"
    return objective, why


def decide_path(
    config: TrainConfig, *, distributed: bool, student, teacher, sharded: bool = False
) -> RunPath:
    """The path of this run. `student` / `teacher`: the loaded (unwrapped) models' holders,
    asked whether the fused head and the lean forward apply to them; `sharded`: FSDP."""
    loss = config.loss
    objective, why = objective_path(loss, distributed=distributed, student=student, teacher=teacher)
    engine = config.sampling.engine
    return RunPath(
        objective=objective,
        objective_why=why,
        # the RL term rides on the distillation objective's own student pass
        rewarded=objective if config.reward.function else None,
        sampler=engine,
        other_sampler="hf" if engine.startswith("vllm") else engine,
        teacher=describe_teacher(config),
        teacher_need=teacher_need(loss),
        rollouts=describe_rollouts(config),
        decoders=describe_decoders(
            config, objective, student, teacher, distributed=distributed, sharded=sharded
        ),
    )


def describe_decoders(
    config: TrainConfig, objective: str, student, teacher, *, distributed: bool, sharded: bool
) -> str:
    """What the `auto` / `lean` keys resolve to for this run's models, e.g. `sampling lean
    (auto), forward: student lean, teacher hf (auto)`; empty when both say `hf`. The
    student's forward is `loss.fused_forward`'s on the fused paths; a teacher's where the
    loss takes its hidden states (`fused_full`) or a local teacher scores tokens or top-k
    from them. An FSDP-sharded model takes hf throughout (the lean forward reads whole
    weights)."""
    shard_teacher = distributed and config.teacher.shard  # FSDP2 over the ranks

    def runs(mode: str, model) -> str:
        split = (sharded and model is student) or (shard_teacher and model is not student)
        return "lean" if not split and lean_applies(model, mode) else "hf"

    parts = []
    engine = config.sampling.engine
    if engine in ("auto", "lean"):
        with torch.no_grad():  # as the sampler runs: checkpointing does not apply there
            parts.append(f"sampling {runs(engine, student)} ({engine})")
    forward = config.loss.fused_forward
    models = {"student": student} if objective != "plain" else {}
    scored = hasattr(teacher, "forward") and teacher_need(config.loss)[0] in ("token", "topk")
    if objective == "fused_full" or scored:
        models["teacher"] = getattr(teacher, "model", None)
    names = ", ".join(f"{name} {runs(forward, m)}" for name, m in models.items() if m is not None)
    if forward in ("auto", "lean") and names:
        parts.append(f"forward: {names} ({forward})")
    return ", ".join(parts)


def describe_rollouts(config: TrainConfig) -> str:
    r = config.rollouts
    if r.mode == "pipelined":
        return f"pipelined lag {r.lag}"
    return f"queue max_staleness {r.max_staleness}" if r.mode == "queue" else "off"
