"""Everything a run needs before its first step: models, teacher, data, optimizer."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd.config.parse import TrainConfig
from opd.data.positions import check_positions
from opd.data.rows import Encoder, PromptOrder, load_run_data
from opd.evaluation.rewards import resolve_reward
from opd.modeling.hf import (
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    shared_vocab_size,
)
from opd.run.lock import release_run_dir
from opd.run.path import RunPath, decide_path
from opd.run.precision import enable_gradient_checkpointing, make_scaler
from opd.run.preflight import Checked, preflight
from opd.run.world import World, init_world
from opd.sampling.vllm import VllmSampler
from opd.sampling.vllm_server import VllmServerSampler
from opd.teachers.cross_tokenizer.cache import cache_retokenizer
from opd.teachers.registry import build_teacher

log = logging.getLogger("opd")


@dataclass
class RunSetup:
    config: TrainConfig
    device: torch.device
    tokenizer: object
    student: torch.nn.Module
    teacher: object | None
    vocab_size: int
    encoder: Encoder
    train_rows: list[dict]
    eval_rows: list[dict]
    order: PromptOrder | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    resume_from: Path | None
    reward_fn: object | None = None  # reward.function resolved: fn(completion_text, row) -> float
    path: RunPath | None = None  # which objective, sampler and teacher path (opd.run.path)
    world: World = field(default_factory=World)  # this process in a multi-process run
    # sampling.engine=vllm: the colocated engine that samples the student (opd.sampling.vllm)
    rollout_engine: object | None = None
    # where each step's batches come from (opd.run.rollouts.Rollouts); set by opd.run.loop.train
    rollouts: object | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16: the loss scaler (opd.run.precision)


def lr_lambda(config: TrainConfig):
    warmup, total, kind = config.optim.warmup_steps, config.steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return (
            max(0.0, 1.0 - progress)
            if kind == "linear"
            else 0.5 * (1 + math.cos(math.pi * progress))
        )

    return factor


def build_student(config: TrainConfig, device: torch.device, resume_from: Path | None):
    path = str(resume_from or config.student.path) if not config.lora.enabled else None
    base = load_causal_lm(path or config.student.path, dtype=config.student.dtype, device=device)
    if config.student.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    if not config.lora.enabled:
        return base
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_from is not None:
        return PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def build_run(config: TrainConfig, checked: Checked | None = None) -> RunSetup:
    """`checked`: what `preflight(config)` returned, if the caller ran it already. The run
    directory stays locked (`opd.run.lock`) until `opd.run.loop.train` returns; if building
    fails, it is released here."""
    try:
        return _build_run(config, checked)
    except BaseException:
        release_run_dir(config.output_dir)
        raise


def _build_run(config: TrainConfig, checked: Checked | None) -> RunSetup:
    checked = checked or preflight(config)  # all that is knowable before a model loads
    config = checked.config
    world = init_world(config)  # World() unless launched by torchrun / accelerate launch
    world.accumulation(config)  # batch_size must split over micro-batches x processes
    if world.sharded and config.teacher.kind == "self" and config.teacher.self_weights == "ema":
        raise ValueError("teacher.self_weights='ema' is not supported with an FSDP student")
    device = world.device if world.distributed else resolve_device(config.device)
    torch.manual_seed(config.seed)
    resume_from = checked.resume_from
    reward_fn = None  # resolved before any model loads, so a bad name fails fast
    if config.reward.function:
        reward_fn = resolve_reward(
            config.reward.function, config.reward.pattern, config.data.answer_field
        )
    tokenizer = load_tokenizer(config.student.path)
    # every row checked and encoded, before the models load
    # a cache written in another tokenizer is re-tokenized for the student
    retokenize = cache_retokenizer(config, tokenizer)
    data = load_run_data(config, tokenizer, checked.train_rows, checked.eval_rows, retokenize)
    encoder, train_rows, eval_rows = data.encoder, data.train_rows, data.eval_rows
    check_positions(  # against the models' config.json, before they load
        config,
        train_rows,
        eval_rows,
        checked.train_rows,
        checked.eval_rows,
    )
    order = PromptOrder(len(train_rows), config.seed)
    student = build_student(config, device, resume_from)
    teacher = build_teacher(
        config, tokenizer, device, student=student, resume_from=resume_from, encoder=encoder
    )
    vocab_size = shared_vocab_size(tokenizer, student)
    path = decide_path(
        config, distributed=world.distributed, student=student, teacher=teacher,
        sharded=world.sharded,
    )
    student = world.wrap_student(student)  # DDP/FSDP; the model itself in one process
    teacher = world.place_teacher(teacher, config.teacher.shard)
    rollout_engine = None
    if path.sampler.startswith("vllm") and world.sharded:
        raise ValueError(
            f"sampling.engine={path.sampler} with an FSDP-sharded student is not supported: "
            "use DDP (each process samples its own rollouts) or one process"
        )
    if path.sampler == "vllm":
        rollout_engine = VllmSampler.for_run(config, world.unwrap(student))
    elif path.sampler == "vllm_server":
        rollout_engine = VllmServerSampler.for_run(config, world.unwrap(student), world)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
        fused=fused_adamw(params, world.sharded),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if config.fp16 and world.sharded:
        raise ValueError("fp16=true with an FSDP student is not supported: use bf16=true")
    return RunSetup(
        config,
        device,
        tokenizer,
        student,
        teacher,
        vocab_size,
        encoder,
        train_rows,
        eval_rows,
        order,
        optimizer,
        scheduler,
        resume_from,
        reward_fn,
        path=path,
        world=world,
        rollout_engine=rollout_engine,
        scaler=make_scaler(config, device),
    )


def fused_adamw(params: list, sharded: bool) -> bool:
    """AdamW's fused kernel (one pass over each parameter) where torch has it: the default
    `foreach` step allocates temporaries the size of every gradient at once (+0.16 GB at
    peak for a 40M-parameter student, measured by benchmarks/step_memory.py). Sharded
    (DTensor) parameters keep the default."""
    return (
        bool(params)
        and not sharded
        and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    )
