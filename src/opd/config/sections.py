"""The sections of a run's configuration (`student`, `teacher`, `data`, `sampling`, `loss`,
`source`, `reward`, `optim`, `lora`, `vllm`), each a typed dataclass validated on creation.

Each class documents its fields in an `Attributes:` block of its docstring and types a
field with a fixed set of values as `Literal[...]`: `opd config` and `opd train --help`
list both (opd.config.docs). `opd.config.parse` assembles them into `TrainConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from opd.config.fields import (  # noqa: F401  (re-exported: opd.config.parse and callers use them)
    METRICS,
    _check_choices,
    _check_metric,
    _check_regex,
    _check_template,
    _in_range,
    _literal_fields,
    _one_of,
    metric_reads_answer,
)
from opd.losses.kinds import KINDS, check_kind

Divergence = Literal[KINDS]
DType = Literal["float32", "bfloat16", "float16"]
DEFAULT_TOPK = 64  # loss.topk=0 resolves to this unless a cache or server says otherwise
MAX_LORA_RANK = 65536  # past any hidden size
MAX_LORA_SCALE = 1024.0  # alpha / r; a larger scale turns the first update into a blow-up
DEFAULT_MAX_ROW_BYTES = 1 << 20  # data.max_row_bytes (opd.data.row_limits)


@dataclass
class ModelConfig:
    """The student model.

    Attributes:
        path: model directory (config.json, weights and tokenizer files) or hub id; required
        dtype: dtype the weights are loaded in (16 bits only with LoRA; bf16/fp16 set compute)
        gradient_checkpointing: recompute layer activations in backward (less memory)
    """

    path: str = ""
    dtype: DType = "float32"
    gradient_checkpointing: bool = False

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

    def __post_init__(self):  # with LoRA off too: a mistake should not wait for the day it is on
        _in_range("lora.r", self.r, 1, MAX_LORA_RANK)
        _in_range("lora.alpha", self.alpha, 1)
        if self.alpha / self.r > MAX_LORA_SCALE:
            raise ValueError(
                f"lora.alpha={self.alpha} with lora.r={self.r} scales the adapter by "
                f"alpha / r = {self.alpha / self.r:g}; at most {MAX_LORA_SCALE:g} is accepted "
                "(common recipes use 0.5 to 4)"
            )
        _in_range("lora.dropout", self.dropout, 0.0, 1.0)


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
        max_row_bytes: a row with more text is refused, naming its file and line, before a
            tokenizer sees it (one holds ~200 bytes of memory per byte it encodes)
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
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES

    def __post_init__(self):
        _check_choices(self)
        _in_range("data.max_prompt_tokens", self.max_prompt_tokens, 1)
        _in_range("data.max_completion_tokens", self.max_completion_tokens, 1)
        _in_range("data.max_row_bytes", self.max_row_bytes, 1)


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
        ratio_cap: pg and the RL term (fused and plain paths alike): cap the importance
            ratio p_S/q at this value (TRL's truncated importance sampling for vLLM
            samples); 0 leaves it uncapped. Under ratio_correction=icepop: the upper bound
        ratio_correction: pg, stale or vLLM samples: tis (truncate the ratio at ratio_cap)
            | icepop (tokens whose ratio lies outside [ratio_floor, ratio_cap] get no
            gradient, NeMo-RL's ICE-POP)
        ratio_floor: ratio_correction=icepop: the lower bound of the ratio
        fused: every objective from the student's hidden states and LM head in tiles, never
            materializing [tokens, vocab] logits (same result as the plain path), also for
            RL + distillation and under DDP/FSDP (run as the wrapper's forward); kd + full
            also needs a local teacher, or a self teacher in one process
        fused_forward: decoder forward of the fused objectives and of a local teacher's token
            and top-k scores: auto (lean where it applies and its start-up check passes, else
            hf, logged) | hf (the model's own) | lean
            (packed real tokens via opd.modeling.lean, checked against hf on the first batch;
            a mismatch stops)
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
    fused_forward: Literal["auto", "hf", "lean"] = "auto"
    ratio_cap: float = 0.0
    ratio_correction: Literal["tis", "icepop"] = "tis"
    ratio_floor: float = 0.0

    def __post_init__(self):
        _check_choices(self)
        if self.objective == "kd":
            try:
                check_kind(self.divergence, beta=self.beta, alpha=self.skew_alpha)
            except ValueError as err:
                raise ValueError(f"loss.divergence={self.divergence!r}: {err}") from None
        # whatever the divergence: a value outside its domain is a mistake even when unused
        _in_range("loss.beta", self.beta, 0.0, 1.0)
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"loss.skew_alpha={self.skew_alpha!r} must be in [0, 1)")
        _in_range("loss.topk", self.topk, 0)
        _in_range("loss.kd_temperature", self.kd_temperature, 0.0, lo_open=True)
        _in_range("loss.discount", self.discount, 0.0, 1.0)
        _in_range("loss.ratio_cap", self.ratio_cap, 0.0)
        _in_range("loss.ratio_floor", self.ratio_floor, 0.0)
        if self.ratio_correction == "icepop" and not self.ratio_floor < self.ratio_cap:
            raise ValueError(
                f"loss.ratio_correction=icepop keeps tokens whose ratio p_S/q lies in "
                f"[loss.ratio_floor, loss.ratio_cap] = [{self.ratio_floor}, {self.ratio_cap}]: "
                "set loss.ratio_cap above loss.ratio_floor (e.g. 0.5 and 2)"
            )


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
        function: '' (off) | exact_match | last_number | boxed | regex | 'module:function'
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
        _check_regex("reward.pattern", self.pattern)


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
