"""What a config implies (`uses_teacher`, `dataset_batches`, `teacher_need`) and settings that would run but compute nothing the config names: refused, saying what to set.

Two kinds: combinations of fields (`check_combinations`, called by `TrainConfig`), and a
preset's defining choice contradicted by the user's own config (`check_preset_conflicts`,
called on the config as written, before the preset fills it in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opd.config.presets import PRESETS
from opd.config.sections import DEFAULT_TOPK, LossConfig

if TYPE_CHECKING:  # parse imports this module: the annotation only
    from opd.config.parse import TrainConfig


def check_precision(config: TrainConfig) -> None:
    """A fully trained student keeps float32 weights (opd.run.precision says why)."""
    dtype = config.student.dtype
    if dtype != "float32" and not config.lora.enabled:
        autocast = "bf16" if dtype == "bfloat16" else "fp16"
        raise ValueError(
            f"student.dtype={dtype} with full fine-tuning: AdamW would update {dtype} weights "
            "with no float32 master copy, and updates smaller than the weight's last digit "
            f"round away. Set student.dtype=float32 and {autocast}=true ({dtype} compute, "
            "float32 weights), or lora.enabled=true (adapters are kept in float32)"
        )
    if config.student.gradient_checkpointing and config.loss.fused_forward == "lean":
        raise ValueError(
            "student.gradient_checkpointing=true with loss.fused_forward=lean: the lean forward "
            "runs its own layer loop, which transformers' checkpointing does not reach; set "
            "loss.fused_forward=hf"
        )


def check_combinations(config: TrainConfig) -> None:
    """Refuse settings that run but compute nothing the config names, saying what to set."""
    loss, lmbda, kind = config.loss, config.source.lmbda, config.teacher.kind
    pure_rl = bool(config.reward.function) and config.reward.distill_weight == 0.0
    check_precision(config)
    if loss.objective == "pg" and lmbda < 1.0:
        raise ValueError(
            f"loss.objective=pg with source.lmbda={lmbda}: pg is the reverse KL estimated on "
            "the student's own samples; on dataset or teacher sequences its gradient estimates "
            "nothing named (on teacher samples it weighs by an unclipped p_S/p_T). Set "
            "source.lmbda=1, or loss.objective=kd to mix sources (GKD)"
        )
    if loss.objective == "ce" and lmbda > 0.0 and not pure_rl:
        raise ValueError(
            f"loss.objective=ce with source.lmbda={lmbda}: cross-entropy on the student's own "
            "samples involves no teacher. Use loss.objective=kd (or pg) for on-policy "
            "distillation, or source.lmbda=0 for SeqKD/SFT on dataset or teacher text"
        )
    if loss.objective == "pg" and loss.kd_temperature != 1.0:
        raise ValueError(
            f"loss.kd_temperature={loss.kd_temperature} has no effect under loss.objective=pg "
            "(the sampled token is scored at temperature 1): remove it, or use "
            "loss.objective=kd; the rollout temperature is sampling.temperature"
        )
    if loss.objective == "pg" and loss.divergence not in ("forward_kl", "reverse_kl"):
        raise ValueError(
            f"loss.divergence={loss.divergence!r} has no effect under loss.objective=pg, which "
            "always estimates the reverse KL from the sampled token: remove it, or use "
            f"loss.objective=kd with loss.divergence={loss.divergence}"
        )
    tempered_topk = loss.objective == "kd" and loss.estimator == "topk" and loss.kd_temperature != 1
    if tempered_topk and kind in ("remote", "cached", "vllm"):
        raise ValueError(
            f"loss.kd_temperature={loss.kd_temperature} with loss.estimator=topk and "
            f"teacher.kind={kind}: that teacher's top-k log-probs are at temperature 1 and "
            "cannot be re-tempered without its full distribution. Use loss.kd_temperature=1 "
            "or a local/self teacher"
        )
    if kind == "cached" and (lmbda > 0.0 or config.source.off_policy == "teacher"):
        raise ValueError(
            "teacher.kind=cached scores only the completions it stored: set source.lmbda=0 and "
            "source.off_policy=dataset (with data.train the cache directory)"
        )
    _check_rollouts(config)
    if kind == "vllm" and loss.objective == "kd" and loss.estimator == "full":
        raise ValueError(
            "teacher.kind='vllm' returns token and top-k log-probs, not full logits: use "
            "loss.objective=pg (sampled token) or loss.estimator=topk (with loss.topk)"
        )
    if kind == "cached" and loss.objective == "kd" and loss.estimator == "full":
        raise ValueError(
            "teacher.kind=cached stores top-k log-probs, not full logits: set loss.estimator=topk"
        )


# The choice that makes a preset what it is: a user setting that contradicts it would run
# a different method under the preset's name (sdft over a local teacher is minillm_like).
PRESET_DEFINES: dict[str, tuple[tuple[str, str], ...]] = {
    "seqkd": (("loss", "objective"),),
    "supervised_kd": (("loss", "objective"), ("source", "lmbda")),
    "gkd": (("loss", "objective"),),
    "on_policy": (("loss", "objective"), ("source", "lmbda")),
    "minillm_like": (("loss", "objective"), ("source", "lmbda")),
    "opsd": (("teacher", "kind"), ("source", "lmbda")),
    "sdft": (("teacher", "kind"), ("source", "lmbda")),
}


def check_preset_conflicts(preset: str, user: dict) -> None:
    """`user`: the config as written (YAML + overrides), before the preset fills it in."""
    for section, key in PRESET_DEFINES.get(preset, ()):
        mine = PRESETS[preset][section][key]
        theirs = (user.get(section) or {}).get(key, mine)
        if theirs != mine:
            raise ValueError(
                f"preset={preset} sets {section}.{key}={mine}, but the config sets "
                f"{section}.{key}={theirs}: that would run another method under the name "
                f"{preset}. Remove one of the two (or choose the preset that matches)"
            )


def teacher_need(loss: LossConfig) -> tuple[str | None, int]:
    """What the teacher must return for this objective (None: no teacher call at all)."""
    if loss.objective == "ce":
        return None, 0
    if loss.objective == "pg":
        return "token", 0
    if loss.estimator == "topk":  # topk=0 before preflight resolved it: the default k
        return "topk", loss.topk or DEFAULT_TOPK
    return "logits", 0


def uses_teacher(config: TrainConfig) -> bool:
    """Whether the run asks a teacher anything (SFT on fixed text and pure RL do not)."""
    if config.loss.objective == "ce" and (
        config.source.lmbda == 1.0 or config.source.off_policy == "dataset"
    ):
        return False
    reward = config.reward
    return not (reward.function and reward.distill_weight == 0 and config.source.lmbda == 1)


def dataset_batches(config: TrainConfig) -> bool:
    return config.source.lmbda < 1.0 and config.source.off_policy == "dataset"


def _check_rollouts(config: TrainConfig) -> None:
    """Asynchronous rollouts (`rollouts.mode`): what they need to mean anything."""
    mode, teacher = config.rollouts.mode, config.teacher
    if mode != "off" and config.source.lmbda == 0.0:
        raise ValueError(
            f"rollouts.mode={mode} moves student sampling beside training, but source.lmbda=0 "
            "samples nothing from the student: set source.lmbda > 0 or rollouts.mode=off"
        )
    if mode == "queue" and teacher.kind == "self" and teacher.self_weights != "frozen":
        raise ValueError(
            f"rollouts.mode=queue with teacher.self_weights={teacher.self_weights}: the "
            "self teacher's weights must be the consumer's at each step, which a free-running "
            "producer does not keep; use rollouts.mode=pipelined or teacher.self_weights=frozen"
        )
