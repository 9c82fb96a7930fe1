"""Typed run configuration: YAML plus dotted `key=value` overrides, validated at start.

Every field is used by some recipe. A preset (`seqkd`, `supervised_kd`, `gkd`,
`on_policy`, `minillm_like`) is a set of defaults for the five design choices
(source, teacher, estimator, divergence, objective); anything the user writes wins.
"""

from __future__ import annotations

import dataclasses
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd.config_checks import check_combinations, check_preset_conflicts
from opd.losses import KINDS, check_kind
from opd.presets import PRESETS


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
    path: str = ""
    dtype: str = "float32"

    def __post_init__(self):
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class LoraConfig:
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
    kind: str = (
        "local"  # local model | self (privileged context) | remote server | cached log-probs
    )
    path: str = ""  # local: model directory or hub id
    dtype: str = "float32"
    url: str = ""  # remote: base URL of an opd or vLLM server
    api_key_env: str = "OPD_TEACHER_TOKEN"  # remote: environment variable holding the bearer token
    timeout_s: float = 60.0
    max_retries: int = 5
    cache_dir: str = ""  # cached: a directory written by `opd generate` / `opd score`
    # self (OPSD/SDFT): the teacher's prompt; {prompt} is the row's data.prompt_field text,
    # any other {name} is that column of the row (the privileged context the student lacks).
    privileged_template: str = "{prompt}\nReference solution: {answer}\n"
    self_weights: str = "frozen"  # self: frozen (start) | ema | live (current, no gradient)
    ema_decay: float = 0.99  # self_weights=ema: theta_bar <- d*theta_bar + (1-d)*theta per step
    # local, multi-process runs: shard the teacher's weights over the ranks (FSDP2) instead of
    # one full eval-mode copy per rank (opd.parallel)
    shard: bool = False

    def __post_init__(self):
        _one_of("teacher.kind", self.kind, ("local", "self", "remote", "cached", "vllm"))
        _one_of("teacher.self_weights", self.self_weights, ("frozen", "ema", "live"))
        _in_range("teacher.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.kind == "self":
            _check_template("teacher.privileged_template", self.privileged_template)
        _one_of("teacher.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _in_range("teacher.timeout_s", self.timeout_s, 0.0, lo_open=True)
        _in_range("teacher.max_retries", self.max_retries, 0)
        if self.shard and self.kind != "local":
            raise ValueError("teacher.shard applies to teacher.kind='local' only")


@dataclass
class DataConfig:
    train: str = ""  # JSONL, Parquet, or a `datasets` directory
    eval: str = ""
    split: str = "train"  # data.train as a `datasets` DatasetDict directory: this split
    eval_split: str = "test"  # data.eval as a DatasetDict directory: this split
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    answer_field: str = "answer"
    chat_template: str = "auto"  # auto: use the tokenizer's chat template if it has one
    system_prompt: str = ""
    max_prompt_tokens: int = 512
    max_completion_tokens: int = 512

    def __post_init__(self):
        _one_of("data.chat_template", self.chat_template, ("auto", "on", "off"))
        _in_range("data.max_prompt_tokens", self.max_prompt_tokens, 1)
        _in_range("data.max_completion_tokens", self.max_completion_tokens, 1)


@dataclass
class SamplingConfig:
    """Rollout sampling. Its temperature is never the loss temperature (`loss.kd_temperature`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    n: int = 1  # samples per prompt
    stop: list[str] = field(default_factory=list)
    # hf (reference sampler) | lean (static-cache fast sampler) | vllm (a colocated vLLM
    # engine holding the student, weights pushed after every optimizer step; opd.sampling.vllm)
    engine: str = "lean"
    # Token ids that end a completion, besides those of the student's generation_config,
    # its tokenizer's EOS and the token its chat template ends a turn with (all are used).
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        _one_of("sampling.engine", self.engine, ("hf", "lean", "vllm"))
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
    objective: str = "kd"  # ce (SeqKD/SFT) | kd (divergence) | pg (sampled reverse-KL advantage)
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd mixture weight, GKD's beta
    skew_alpha: float = 0.1  # DistiLLM skew for skew_* divergences
    estimator: str = (
        "full"  # full vocabulary | topk (+ tail bucket); pg always uses the sampled token
    )
    topk: int = 64
    kd_temperature: float = 1.0
    discount: float = 0.0  # pg: discount of the per-token advantage to go
    # kd + full + local teacher: compute the divergence from hidden states and LM heads in
    # tiles (opd.losses.fused), never materializing [tokens, vocab] logits. Same result.
    fused: bool = True
    # pg: cap the importance ratio p_S/q at this value (TRL's truncated importance sampling
    # for vLLM samples, Yao et al. 2025); 0 leaves it uncapped
    ratio_cap: float = 0.0

    def __post_init__(self):
        _one_of("loss.objective", self.objective, ("ce", "kd", "pg"))
        _one_of("loss.divergence", self.divergence, KINDS)
        _one_of("loss.estimator", self.estimator, ("full", "topk"))
        if self.objective == "kd":
            try:
                check_kind(self.divergence, beta=self.beta, alpha=self.skew_alpha)
            except ValueError as err:
                raise ValueError(f"loss.divergence={self.divergence!r}: {err}") from None
        _in_range("loss.topk", self.topk, 1)
        _in_range("loss.kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        _in_range("loss.discount", self.discount, 0.0, 1.0)
        _in_range("loss.ratio_cap", self.ratio_cap, 0.0)


@dataclass
class SourceConfig:
    lmbda: float = 0.0  # GKD's lambda: probability that a micro-batch is sampled by the student
    off_policy: str = "dataset"  # where the other batches come from: dataset | teacher

    def __post_init__(self):
        _in_range("source.lmbda", self.lmbda, 0.0, 1.0)
        _one_of("source.off_policy", self.off_policy, ("dataset", "teacher"))


@dataclass
class RewardConfig:
    """RL + on-policy distillation (GKD, Agarwal et al. 2024, sec. 3.3).

    Student-sampled batches minimize (1 - distill_weight) * PG(reward) + distill_weight * D,
    i.e. maximize (1-a)*E[r] - a*E[D] with a = distill_weight (GKD's alpha; not loss.skew_alpha).
    """

    # '' (off) | exact_match | boxed | regex | 'module:function' fn(text, row) -> float
    function: str = ""
    pattern: str = ""  # regex: the answer is the last match's first group (or whole match)
    distill_weight: float = 0.5  # GKD's alpha: 1 = pure on-policy distillation, 0 = pure RL
    normalize: str = "group"  # group: (r - mean)/(std + eps) over the sampling.n samples | none

    def __post_init__(self):
        _in_range("reward.distill_weight", self.distill_weight, 0.0, 1.0)
        _one_of("reward.normalize", self.normalize, ("group", "none"))
        if self.function:
            _check_metric("reward.function", self.function, self.pattern, "reward.pattern")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        _in_range("optim.lr", self.lr, 0.0, lo_open=True)
        _one_of("optim.schedule", self.schedule, ("constant", "linear", "cosine"))
        _in_range("optim.warmup_steps", self.warmup_steps, 0)
        _in_range("optim.max_grad_norm", self.max_grad_norm, 0.0)


@dataclass
class VllmConfig:
    """Each vLLM engine a run starts (sampling.engine=vllm, teacher.kind=vllm)."""

    gpu_memory_utilization: float = 0.3  # GPU: share of its memory each engine may hold
    # KV cache per engine in GiB; 0: sized by gpu_memory_utilization on GPU, 1 GiB on CPU
    # (where vLLM's share would mean a share of all RAM)
    kv_cache_gb: float = 0.0

    def __post_init__(self):
        _in_range(
            "vllm.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True
        )
        _in_range("vllm.kv_cache_gb", self.kv_cache_gb, 0.0)


@dataclass
class TrainConfig:
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
    batch_size: int = 8  # prompts per optimizer step (each sampled `sampling.n` times on-policy)
    micro_batch_size: int = 8  # prompts per forward/backward; accumulation = batch / micro
    seed: int = 0
    output_dir: str = "runs/opd"
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_size: int = 64
    # exact_match | boxed | regex (with eval_pattern) | a Python callable "module:function"
    eval_metric: str = "exact_match"
    eval_pattern: str = ""  # eval_metric=regex: the answer is the last match's first group
    log_every: int = 1
    device: str = "auto"
    bf16: bool = False  # autocast on CUDA
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    tensorboard: bool = False
    resume: bool = False  # continue from the latest checkpoint in output_dir

    def __post_init__(self):
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


def parse_override(item: str) -> dict:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}; the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. loss.beta=0.5)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at top level")
    return config_from_dict(data, overrides)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)
