"""Typed run configuration: YAML plus dotted `key=value` overrides, validated at start.

Every field is used by some recipe. A preset (`seqkd`, `supervised_kd`, `gkd`,
`on_policy`, `minillm_like`) is a set of defaults for the five design choices
(source, teacher, estimator, divergence, objective); anything the user writes wins.

Each class documents its fields in an `Attributes:` block of its docstring and types a
field with a fixed set of values as `Literal[...]`: `opd config` and `opd train --help`
list both (opd.config.docs), so the docs live in one place, next to the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from opd.config.checks import check_combinations, check_preset_conflicts
from opd.config.cross_tokenizer import CrossTokenizerConfig
from opd.config.presets import PRESETS
from opd.config.rollouts import RolloutsConfig, SamplingConfig, VllmConfig
from opd.config.sections import (  # noqa: F401  (re-exported: the names tests and callers import from here)
    DEFAULT_TOPK,
    METRICS,
    DataConfig,
    Divergence,
    DType,
    LoraConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SourceConfig,
    _check_choices,
    _check_metric,
    _check_template,
    _in_range,
    _literal_fields,
    _one_of,
)
from opd.config.teachers import RoutingConfig, TeacherConfig, resolve_teachers


@dataclass
class TrainConfig:
    """One distillation run.

    Attributes:
        preset: named defaults for source, teacher, estimator, divergence and objective;
            every key you set wins ('' for none)
        steps: optimizer steps
        batch_size: prompts per optimizer step (each sampled `sampling.n` times on-policy)
        micro_batch_size: prompts per forward/backward; accumulation = batch / micro
        seed: seeds sampling, data order and initialization
        output_dir: run directory: config.yaml, metrics.jsonl, checkpoints/
        save_every: checkpoint every this many steps (0: only at the end)
        keep_checkpoints: checkpoints kept on disk (the oldest are deleted)
        eval_every: task metric on data.eval every this many steps (0: never)
        eval_size: rows of data.eval used
        eval_metric: exact_match (the final answer, normalized, against data.answer_field) |
            last_number (the completion's last number) | boxed (the last \\boxed{} answer) |
            regex (with eval_pattern) | 'module:function', fn(text, row) -> float
        eval_pattern: eval_metric=regex: the answer is the last match's first group
        log_every: metrics.jsonl line (and progress line without a terminal) every this
            many steps
        device: auto (CUDA if available, else CPU) | cpu | cuda | cuda:N
        bf16: bfloat16 autocast of the forward and loss (CUDA only); weights stay float32
        fp16: float16 autocast of the forward and loss (CUDA only) with a loss scaler
            (torch.amp.GradScaler); weights stay float32
        max_bad_steps: consecutive non-finite steps before the run stops
        vllm: settings of each vLLM engine (sampling.engine=vllm, teacher.kind=vllm)
        rollouts: asynchronous rollouts: sampling beside training, with bounded staleness
        teachers: several teachers by name, each a `teacher` section of any kind, instead of
            `teacher` (one entry is the same as `teacher`); `routing` picks each row's
        routing: which of `teachers` scores each row (see RoutingConfig)
        resume_allow_changes: keys (or sections, e.g. optim) whose change since the
            checkpoint a resume accepts; any other change to what the run computes is refused
        report_to: where metrics go besides metrics.jsonl (always written): tensorboard
            (opd[tensorboard]), wandb (opd[wandb]), trackio (opd[trackio])
        resume: continue from the latest checkpoint in output_dir
    """

    preset: str = ""
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cross_tokenizer: CrossTokenizerConfig = field(default_factory=CrossTokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    rollouts: RolloutsConfig = field(default_factory=RolloutsConfig)
    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 8
    seed: int = 0
    output_dir: str = "runs/opd"
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_size: int = 64
    eval_metric: str = "exact_match"
    eval_pattern: str = ""
    log_every: int = 1
    device: str = "auto"
    bf16: bool = False
    fp16: bool = False
    max_bad_steps: int = 3
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio"]] = field(
        default_factory=lambda: ["jsonl"]
    )
    resume: bool = False
    resume_allow_changes: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check_choices(self)
        _one_of("preset", self.preset, ("", *PRESETS))
        resolve_teachers(self)  # `teachers:` -> `teacher` (one) or a routed teacher (several)
        _in_range("steps", self.steps, 1)
        _in_range("batch_size", self.batch_size, 1)
        _in_range("micro_batch_size", self.micro_batch_size, 1)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        for key in ("save_every", "eval_every", "eval_size"):
            _in_range(key, getattr(self, key), 0)
        _in_range("log_every", self.log_every, 1)
        _in_range("keep_checkpoints", self.keep_checkpoints, 1)
        _in_range("max_bad_steps", self.max_bad_steps, 1)
        if self.bf16 and self.fp16:
            raise ValueError("bf16=true and fp16=true: choose one autocast dtype")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        if not self.student.path:
            raise ValueError("student.path is required (a model directory or hub id)")
        if self.loss.objective == "pg" and self.loss.estimator == "topk":
            raise ValueError(
                "loss.estimator='topk' does not apply to loss.objective='pg' (it uses the sampled token)"
            )
        needs_teacher_samples = self.source.lmbda < 1.0 and self.source.off_policy == "teacher"
        if needs_teacher_samples and self.teacher.kind not in ("local",):
            fix = (
                "set source.off_policy=dataset to train on the completions the cache stored "
                "(with data.train the cache directory)"
                if self.teacher.kind == "cached"
                else "use teacher.kind=local, or source.off_policy=dataset to train on the "
                "dataset's completions"
            )
            raise ValueError(
                f"source.off_policy='teacher' samples the teacher live, which needs "
                f"teacher.kind='local' (a model that can sample), not {self.teacher.kind!r}: "
                f"{fix}"
            )
        if self.source.lmbda < 1.0 and self.source.off_policy == "dataset" and not self.data.train:
            raise ValueError(
                "data.train is required when batches come from the dataset (source.lmbda < 1)"
            )
        if self.reward.function:
            self._check_reward()
        for i, key in enumerate(self.resume_allow_changes):
            if field_type(key) is None:
                raise ValueError(
                    f"resume_allow_changes[{i}]={key!r} is not a config key or section (e.g. "
                    "optim, optim.lr); `opd config` lists them"
                )
        _check_metric("eval_metric", self.eval_metric, self.eval_pattern, "eval_pattern")
        check_combinations(self)

    def _check_reward(self) -> None:
        if self.source.lmbda == 0.0:
            raise ValueError(
                "reward.function needs student samples: set source.lmbda > 0 (rewards score "
                "the student's own completions)"
            )
        if self.reward.normalize == "group" and self.sampling.n < 2:
            raise ValueError(
                "reward.normalize='group' needs sampling.n >= 2 (a group of one sample has zero "
                "advantage); raise sampling.n or use reward.normalize=none"
            )
        if self.reward.distill_weight > 0 and self.loss.objective == "ce":
            raise ValueError(
                "reward.distill_weight > 0 mixes in a distillation term: use loss.objective=kd "
                "or pg (or reward.distill_weight=0 for pure RL)"
            )

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value, hint, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        inner = typing.get_args(hint)[1]
        return {str(k): _coerce(v, inner, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]  # one item, as written (`sampling.stop=###`)
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list, got {value!r}")
        item = (typing.get_args(hint) or (None,))[0]
        for i, v in enumerate(value):
            if item in (str, int) and (not isinstance(v, item) or isinstance(v, bool)):
                raise ValueError(f"{key}[{i}]={v!r} must be of type {item.__name__}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML reads YAML 1.1, where `2e-5` (no dot) is a string: take it as people mean it.
        try:
            return float(value)
        except ValueError:
            pass
    if typing.get_origin(hint) is Literal:
        return value  # checked against its values in __post_init__
    if (hint in (int, float, str) and not isinstance(value, hint)) or (
        isinstance(value, bool) and hint is not bool
    ):
        raise ValueError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        built = cls(**kwargs)
    except ValueError as err:
        msg = str(err)
        raise ValueError(
            msg if not prefix or msg.startswith(prefix) else f"{prefix}{msg}"
        ) from None
    for key, value in kwargs.items():  # every float given, used by this run or not
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{key}={value!r} must be a finite number")
    return built


def field_type(key: str, cls=None):
    """The type hint of a dotted config key, or None if there is no such key."""
    hint = cls or TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
        if hint is None:
            return None
    return hint


def parse_override(item: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}.

    A string field takes the text as written (`data.system_prompt=Note: be brief`); any
    other value is read as YAML (numbers, true/false, lists such as `[a, b]`)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. loss.beta=0.5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    hint = field_type(key)
    if hint is str or typing.get_origin(hint) is Literal or not raw:
        value = raw
    elif hint == list[str] and not raw.lstrip().startswith("["):
        value = [raw]  # one stop string, as written (`sampling.stop=###`)
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(
                f"override {item!r}: the value is not valid YAML ({problem})"
            ) from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def config_from_dict(data: dict, overrides: list[str] = ()) -> TrainConfig:
    for item in overrides:
        data = _deep_merge(data, parse_override(item))
    preset = data.get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise ValueError(
                f"preset={preset!r} is not allowed; choose one of: {', '.join(PRESETS)}"
            )
        check_preset_conflicts(preset, data)
        data = _deep_merge(PRESETS[preset], data)
    return _build(TrainConfig, data)


def read_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file; errors name the file (and line) and what to do."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass a YAML file (see examples/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not a text file; pass a YAML file") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping (key: value) at top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(data, overrides)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)
