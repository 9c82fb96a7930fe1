"""Typed run configuration: YAML plus dotted `key=value` overrides, validated at start.

Every field is used by some recipe. A preset (`seqkd`, `supervised_kd`, `gkd`,
`on_policy`, `minillm_like`) is a set of defaults for the five design choices
(source, teacher, estimator, divergence, objective); anything the user writes wins.

Each class documents its fields in an `Attributes:` block of its docstring and types a
field with a fixed set of values as `Literal[...]`: `opd config` and `opd train --help`
list both (opd.config_docs), so the docs live in one place, next to the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from opd.config_checks import check_combinations, check_preset_conflicts
from opd.losses.kinds import KINDS, check_kind
from opd.presets import PRESETS

Divergence = Literal[KINDS]
DType = Literal["float32", "bfloat16", "float16"]
DEFAULT_TOPK = 64  # loss.topk=0 resolves to this unless a cache or server says otherwise


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(
            f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
        )


def _in_range(key: str, value, lo=None, hi=None, *, lo_open=False) -> None:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{key}={value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{key}={value!r} must be <= {hi}")


@functools.cache
def _literal_fields(cls) -> dict[str, tuple]:
    """Field name -> allowed values, for fields typed `Literal[...]` or `list[Literal[...]]`."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is list:
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            out[name] = typing.get_args(hint)
    return out


def _check_choices(obj) -> None:
    """Every `Literal` field holds one of its values; the message names the key."""
    for name, allowed in _literal_fields(type(obj)).items():
        value = getattr(obj, name)
        for item in value if isinstance(value, list) else [value]:
            _one_of(name, item, allowed)


def _check_template(key: str, template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(f"{key}={template!r} is not a valid template: {err}") from None
    if any(not f or not f.isidentifier() for f in fields):
        raise ValueError(f"{key}={template!r}: use named fields such as {{prompt}} or {{answer}}")


METRICS = ("exact_match", "boxed", "regex")  # built in (opd.rewards); else "module:function"


def _check_metric(key: str, name: str, pattern: str, pattern_key: str) -> None:
    if name not in METRICS and ":" not in name:
        raise ValueError(
            f"{key}={name!r}: use one of {', '.join(METRICS)} or a callable 'module:function'"
        )
    if name == "regex":
        if not pattern:
            raise ValueError(f"{key}='regex' needs {pattern_key} (a regular expression)")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{pattern_key}={pattern!r} is not a regex: {err}") from None


@dataclass
class ModelConfig:
    """The student model.

    Attributes:
        path: model directory (config.json, weights and tokenizer files) or hub id; required
        dtype: dtype the weights are loaded in
    """

    path: str = ""
    dtype: DType = "float32"

    def __post_init__(self):
        _check_choices(self)


@dataclass
class LoraConfig:
    """LoRA adapters on the student instead of full fine-tuning (needs opd[lora]).

    Attributes:
        enabled: train LoRA adapters; checkpoints then hold the adapter only
        r: adapter rank
        alpha: LoRA scaling numerator (scale = alpha / r)
        dropout: dropout on the adapter input
        target_modules: names of the linear layers that get adapters
    """

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def __post_init__(self):
        _in_range("lora.r", self.r, 1)
        _in_range("lora.dropout", self.dropout, 0.0, 1.0)


@dataclass
class TeacherConfig:
    """The teacher: what scores the sequences.

    Attributes:
        kind: local model | self (the student with privileged context) | remote server |
            cached log-probs from `opd generate` / `opd score` | vllm (a local vLLM engine
            scoring with prompt_logprobs: pg and topk estimators only)
        path: local: model directory or hub id
        dtype: local: dtype the teacher's weights are loaded in
        url: remote: base URL of an `opd serve` or vLLM server
        api_key_env: remote: environment variable holding the server's bearer token
        timeout_s: remote: seconds per request before a retry
        max_retries: remote: retries before the run stops (its checkpoint intact)
        cache_dir: cached: the cache directory (default: data.train when that is a cache)
        privileged_template: self (OPSD/SDFT): the teacher's prompt; {prompt} is the row's
            data.prompt_field text, any other {name} is that column of the row (the
            privileged context the student lacks)
        self_weights: self: frozen (the start) | ema | live (the current weights, no gradient)
        ema_decay: self_weights=ema: theta_bar <- d*theta_bar + (1-d)*theta per step
        shard: local, multi-process runs: shard the teacher's weights over the ranks (FSDP2)
            instead of one full copy per rank
    """

    kind: Literal["local", "self", "remote", "cached", "vllm"] = "local"
    path: str = ""
    dtype: DType = "float32"
    url: str = ""
    api_key_env: str = "OPD_TEACHER_TOKEN"
    timeout_s: float = 60.0
    max_retries: int = 5
    cache_dir: str = ""
    privileged_template: str = "{prompt}\nReference solution: {answer}\n"
    self_weights: Literal["frozen", "ema", "live"] = "frozen"
    ema_decay: float = 0.99
    shard: bool = False

    def __post_init__(self):
        _check_choices(self)
        _in_range("teacher.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.kind == "self":
            _check_template("teacher.privileged_template", self.privileged_template)
        _in_range("teacher.timeout_s", self.timeout_s, 0.0, lo_open=True)
        _in_range("teacher.max_retries", self.max_retries, 0)
        if self.shard and self.kind != "local":
            raise ValueError("teacher.shard applies to teacher.kind='local' only")


@dataclass
class DataConfig:
    """Where prompts (and completions) come from and how they become tokens.

    Attributes:
        train: training rows: JSONL, JSON, Parquet (opd[data]), a `datasets` directory
            (opd[data]) or an opd teacher cache
        eval: held-out rows for eval_every / `opd eval` (same formats)
        prompt_field: the column holding the prompt text
        completion_field: the column holding the completion (batches from the dataset)
        answer_field: the column the task metric and rewards compare against
        chat_template: auto: the tokenizer's chat template if it has one | on | off
        system_prompt: system message put before each prompt (chat template only)
        max_prompt_tokens: prompts are cut to this many tokens (from the left)
        max_completion_tokens: dataset completions are cut to this many tokens (a cut
            completion gets no EOS)
        split: data.train as a `datasets` DatasetDict directory: this split
        eval_split: data.eval as a DatasetDict directory: this split
    """

    train: str = ""
    eval: str = ""
    split: str = "train"  # data.train as a `datasets` DatasetDict directory: this split
    eval_split: str = "test"  # data.eval as a DatasetDict directory: this split
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    answer_field: str = "answer"
    chat_template: Literal["auto", "on", "off"] = "auto"
    system_prompt: str = ""
    max_prompt_tokens: int = 512
    max_completion_tokens: int = 512

    def __post_init__(self):
        _check_choices(self)
        _in_range("data.max_prompt_tokens", self.max_prompt_tokens, 1)
        _in_range("data.max_completion_tokens", self.max_completion_tokens, 1)


@dataclass
class SamplingConfig:
    """Rollout sampling. Its temperature is never the loss temperature (`loss.kd_temperature`).

    Attributes:
        temperature: sampling temperature of student (and teacher) rollouts; 0 is greedy
        top_p: nucleus sampling mass (1: off)
        top_k: sample among the k most likely tokens (0: off)
        max_new_tokens: longest sampled completion
        n: samples per prompt in a student-sampled batch
        stop: strings that end a sampled completion (besides EOS)
        eos_token_ids: token ids that end a completion, besides the student's
            generation_config, its tokenizer's EOS and the chat template's turn end
        engine: hf (the reference sampler, plain HF forward) | vllm (a colocated vLLM engine
            holding the student, weights pushed after every optimizer step) | lean (opd.modeling.lean's
            Llama/Qwen decoder on a static KV cache, checked against hf on the first batch)
        cuda_graphs: lean on CUDA: replay decode steps as a CUDA graph (opt-in; never yet
            checked on a GPU)
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    n: int = 1
    stop: list[str] = field(default_factory=list)
    engine: Literal["hf", "lean", "vllm"] = "hf"
    cuda_graphs: bool = False
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        _check_choices(self)
        _in_range("sampling.temperature", self.temperature, 0.0)
        _in_range("sampling.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _in_range("sampling.top_k", self.top_k, 0)
        _in_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        _in_range("sampling.n", self.n, 1)
        for i, token_id in enumerate(self.eos_token_ids):
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise ValueError(
                    f"sampling.eos_token_ids[{i}]={token_id!r} must be a token id (int >= 0)"
                )


@dataclass
class LossConfig:
    """What is minimized on each batch.

    Attributes:
        objective: ce (cross-entropy on the sequence: SeqKD/SFT) | kd (a divergence to the
            teacher) | pg (sampled-token reverse-KL advantage, Thinking Machines)
        divergence: kd: per-token divergence between teacher and student
        beta: jsd: mixture weight, GKD's beta (0 < beta < 1)
        skew_alpha: skew_*: DistiLLM's skew
        estimator: kd: full vocabulary | topk (+ tail bucket); pg always uses the sampled token
        topk: estimator=topk: teacher tokens per position; 0: the cache's k with a cached
            teacher, else 64 (capped at a remote server's limit)
        kd_temperature: divides both models' logits in the loss (not sampling.temperature)
        discount: pg: discount of the per-token advantage to go
        ratio_cap: pg: cap the importance ratio p_S/q at this value (TRL's truncated
            importance sampling for vLLM samples); 0 leaves it uncapped
        fused: every objective from the student's hidden states and LM head in tiles, never
            materializing [tokens, vocab] logits (same result as the plain path); kd + full
            also needs a local or self teacher
        fused_forward: decoder forward of the fused objectives: hf (the model's own) | lean
            (packed real tokens via opd.modeling.lean, checked against hf on the first batch)
    """

    objective: Literal["ce", "kd", "pg"] = "kd"
    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    skew_alpha: float = 0.1
    estimator: Literal["full", "topk"] = "full"
    topk: int = 0
    kd_temperature: float = 1.0
    discount: float = 0.0
    fused: bool = True
    fused_forward: Literal["hf", "lean"] = "hf"
    ratio_cap: float = 0.0

    def __post_init__(self):
        _check_choices(self)
        if self.objective == "kd":
            try:
                check_kind(self.divergence, beta=self.beta, alpha=self.skew_alpha)
            except ValueError as err:
                raise ValueError(f"loss.divergence={self.divergence!r}: {err}") from None
        _in_range("loss.topk", self.topk, 0)
        _in_range("loss.kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        _in_range("loss.discount", self.discount, 0.0, 1.0)
        _in_range("loss.ratio_cap", self.ratio_cap, 0.0)


@dataclass
class SourceConfig:
    """Where each micro-batch's sequences come from.

    Attributes:
        lmbda: GKD's lambda: probability that a micro-batch is sampled by the student
        off_policy: where the other micro-batches come from: dataset completions | live
            teacher samples
    """

    lmbda: float = 0.0
    off_policy: Literal["dataset", "teacher"] = "dataset"

    def __post_init__(self):
        _check_choices(self)
        _in_range("source.lmbda", self.lmbda, 0.0, 1.0)


@dataclass
class RewardConfig:
    """RL + on-policy distillation (GKD, Agarwal et al. 2024, sec. 3.3).

    Student-sampled batches minimize (1 - distill_weight) * PG(reward) + distill_weight * D,
    i.e. maximize (1-a)*E[r] - a*E[D] with a = distill_weight (GKD's alpha; not loss.skew_alpha).

    Attributes:
        function: '' (off) | exact_match | boxed | regex | 'module:function',
            fn(text, row) -> float
        pattern: regex: the answer is the last match's first group (or the whole match)
        distill_weight: GKD's alpha: 1 = pure on-policy distillation, 0 = pure RL
        normalize: group: (r - mean) / (std + eps) over the sampling.n samples | none
    """

    function: str = ""
    pattern: str = ""
    distill_weight: float = 0.5
    normalize: Literal["group", "none"] = "group"

    def __post_init__(self):
        _check_choices(self)
        _in_range("reward.distill_weight", self.distill_weight, 0.0, 1.0)
        if self.function:
            _check_metric("reward.function", self.function, self.pattern, "reward.pattern")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Attributes:
        lr: peak learning rate
        weight_decay: AdamW weight decay
        schedule: learning rate after warm-up: constant | linear decay to 0 | cosine to 0
        warmup_steps: linear warm-up steps
        max_grad_norm: gradient-norm clipping; 0 disables it
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        _check_choices(self)
        if not math.isfinite(self.lr) or self.lr <= 0:  # inf passes `> 0` and nan every test
            raise ValueError(f"optim.lr={self.lr!r} must be a finite number > 0")
        _in_range("optim.warmup_steps", self.warmup_steps, 0)
        _in_range("optim.max_grad_norm", self.max_grad_norm, 0.0)


@dataclass
class VllmConfig:
    """Each vLLM engine a run starts (sampling.engine=vllm, teacher.kind=vllm).

    Attributes:
        gpu_memory_utilization: GPU: share of its memory each engine may hold
        kv_cache_gb: KV cache per engine in GiB; 0: sized by gpu_memory_utilization on GPU,
            1 GiB on CPU (where vLLM's share would mean a share of all RAM)
    """

    gpu_memory_utilization: float = 0.3
    kv_cache_gb: float = 0.0

    def __post_init__(self):
        _in_range(
            "vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True
        )
        _in_range("vllm.kv_cache_gb", self.kv_cache_gb, 0.0)


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
        eval_metric: exact_match (normalized, against data.answer_field) | boxed (the last
            \\boxed{} answer) | regex (with eval_pattern) | 'module:function', fn(text, row) -> float
        eval_pattern: eval_metric=regex: the answer is the last match's first group
        log_every: metrics.jsonl line (and progress line without a terminal) every this
            many steps
        device: auto (CUDA if available, else CPU) | cpu | cuda | cuda:N
        bf16: bfloat16 autocast of the forward and loss (CUDA only)
        max_bad_steps: consecutive non-finite steps before the run stops
        vllm: settings of each vLLM engine (sampling.engine=vllm, teacher.kind=vllm)
        resume_allow_changes: keys (or sections, e.g. optim) whose change since the
            checkpoint a resume accepts; any other change to what the run computes is refused
        report_to: where metrics go besides metrics.jsonl (always written): tensorboard
            (opd[tensorboard]), wandb (opd[wandb]), trackio (opd[trackio])
        resume: continue from the latest checkpoint in output_dir
    """

    preset: str = ""
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
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
    max_bad_steps: int = 3
    report_to: list[Literal["jsonl", "tensorboard", "wandb", "trackio"]] = field(
        default_factory=lambda: ["jsonl"]
    )
    resume: bool = False
    resume_allow_changes: list[str] = field(default_factory=list)

    def __post_init__(self):
        _check_choices(self)
        _one_of("preset", self.preset, ("", *PRESETS))
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
            raise ValueError(
                "source.off_policy='teacher' needs teacher.kind='local' (a model that can sample)"
            )
        if self.source.lmbda < 1.0 and self.source.off_policy == "dataset" and not self.data.train:
            raise ValueError(
                "data.train is required when batches come from the dataset (source.lmbda < 1)"
            )
        if self.reward.function:
            self._check_reward()
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
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key} must be a list, got {value!r}")
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
        return cls(**kwargs)
    except ValueError as err:
        msg = str(err)
        raise ValueError(
            msg if not prefix or msg.startswith(prefix) else f"{prefix}{msg}"
        ) from None


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
