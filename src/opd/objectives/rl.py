"""RL + on-policy distillation: a task reward mixed with the distillation loss.

GKD (Agarwal et al. 2024, sec. 3.3) maximizes `(1-a)*E_{y~p_S}[r(y)] - a*E_{y~p_S}[D(y|x)]`.
Here that is, on every student-sampled micro-batch,

    loss = (1 - a) * PG(reward) + a * distill,     a = reward.distill_weight

* `PG(reward)` is a token-level policy-gradient loss `-(p_S/q)(y_t) * A_i` over all tokens
  of sequence i, with a sequence advantage `A_i` from its reward. With `normalize=group`
  the `sampling.n` samples of one prompt form a group and `A_i = (r_i - mean)/(std + eps)`
  (GRPO, Shao et al. 2024; std with Bessel's correction, as TRL's GRPOTrainer);
  `q` is the sampler's log-prob, so the ratio is 1 in value when the sampler is the
  current student at temperature 1 and corrects for temperature/top-p otherwise.
* `distill` is the configured objective (`kd` with any divergence and estimator, or `pg`),
  exactly as `opd.objectives.per_token_loss` computes it without a reward.

Both terms are summed over tokens and divided by the step's token count (as `batch_loss`),
so gradient accumulation leaves them unchanged. `a = 1` is pure on-policy distillation
(the reward is only logged), `a = 0` pure RL (the teacher is not called at all).
Batches from the dataset or the teacher carry no student samples and keep the plain
distillation loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config.parse import LossConfig
from opd.data.batch import SequenceBatch
from opd.losses import masked_sum, policy_gradient_loss
from opd.modeling.hf import completion_logits, token_logprobs
from opd.objectives.base import Scored, TokenTerms, report_divergence
from opd.objectives.plain import per_token_loss
from opd.teachers.base import TeacherScores

EPS = 1e-4  # as TRL's GRPO: keeps an all-equal group (std 0) at advantage 0


def completion_texts(batch: SequenceBatch, tokenizer) -> list[str]:
    """Each row's completion decoded without special tokens (EOS, padding)."""
    ids, mask = batch.completion_ids().cpu(), batch.loss_mask().cpu()
    return [
        tokenizer.decode(ids[i][mask[i]].tolist(), skip_special_tokens=True)
        for i in range(batch.size)
    ]


def sequence_rewards(batch: SequenceBatch, tokenizer, reward_fn) -> torch.Tensor:
    """`[B]` float32: `reward_fn(completion_text, row)` for every row of the batch."""
    if len(batch.rows) != batch.size:
        raise ValueError(f"rewards need the dataset rows: {len(batch.rows)} for {batch.size}")
    texts = completion_texts(batch, tokenizer)
    return torch.tensor(
        [float(reward_fn(t, row)) for t, row in zip(texts, batch.rows, strict=True)],
        dtype=torch.float32,
    )


def group_advantages(rewards_B: torch.Tensor, group_size: int, normalize: str) -> torch.Tensor:
    """`[B] -> [B]` sequence advantages; rows `g*n .. g*n+n-1` are one prompt's samples."""
    if normalize == "none":
        return rewards_B.clone()
    if normalize != "group":
        raise ValueError(f"normalize={normalize!r} not in ('group', 'none')")
    if group_size < 2 or rewards_B.numel() % group_size:
        raise ValueError(
            f"group normalization needs groups of >= 2 samples: {rewards_B.numel()} rewards, "
            f"group size {group_size}"
        )
    groups = rewards_B.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    return (centered / (groups.std(dim=1, keepdim=True) + EPS)).view(-1)


def reward_pg_loss(
    student_logprobs_BL: torch.Tensor,
    advantages_B: torch.Tensor,
    sampler_logprobs_BL: torch.Tensor | None,
    loss: LossConfig | None = None,
) -> torch.Tensor:
    """`[B, L]` per-token `-(p_S/q)(y_t) * A_i`, every token of row i sharing `A_i`; the
    ratio corrected as `loss.ratio_correction` says (stale or vLLM samples)."""
    adv = advantages_B.to(student_logprobs_BL.device)[:, None].expand_as(student_logprobs_BL)
    if loss is None:
        return policy_gradient_loss(student_logprobs_BL, adv, sampler_logprobs_BL)
    return policy_gradient_loss(
        student_logprobs_BL,
        adv,
        sampler_logprobs_BL,
        loss.ratio_cap,
        loss.ratio_correction,
        loss.ratio_floor,
    )


@dataclass
class MixedLoss:
    loss: torch.Tensor  # the micro-batch's share of the step loss (backward this)
    divergence_sum: float  # summed per-token divergence estimate (0 when a = 0: not measured)
    reward_term: float  # (1 - a) * PG(reward), normalized by the step's tokens
    distill_term: float  # a * distill, normalized by the step's tokens


def mixed_batch_loss(
    student_logits_BLV: torch.Tensor,
    batch: SequenceBatch,
    scores: TeacherScores | None,
    loss: LossConfig,
    num_tokens: int,
    advantages_B: torch.Tensor,
    distill_weight: float,
    teacher=None,
) -> MixedLoss:
    """`(1-a) * PG(reward) + a * distill` of one student micro-batch (see module doc); the
    divergence split by row for `teacher` when it routes rows to several teachers."""
    mask = batch.loss_mask().to(student_logits_BLV.device)
    denom = max(num_tokens, 1)
    total = student_logits_BLV.new_zeros((), dtype=torch.float32)
    reward_term = distill_term = div_sum = 0.0
    if distill_weight < 1.0:
        student_lp = token_logprobs(student_logits_BLV, batch.completion_ids())
        sampler_lp = None
        if batch.sampler_logprobs is not None:
            sampler_lp = batch.sampler_logprobs[:, batch.prompt_width :].to(student_lp.device)
        pg = reward_pg_loss(student_lp, advantages_B, sampler_lp, loss)
        pg = masked_sum(pg, mask) / denom
        total = total + (1.0 - distill_weight) * pg
        reward_term = (1.0 - distill_weight) * float(pg.detach())
    if distill_weight > 0.0:
        if scores is None:
            raise ValueError("reward.distill_weight > 0 needs teacher scores for the batch")
        value, divergence = per_token_loss(student_logits_BLV, batch, scores, loss)
        distill = masked_sum(value, mask) / denom
        total = total + distill_weight * distill
        distill_term = distill_weight * float(distill.detach())
        div_sum = float(masked_sum(divergence, mask))
        report_divergence(teacher, scores, batch, divergence, mask)
    return MixedLoss(total, div_sum, reward_term, distill_term)


def mixed_token_loss(
    terms: TokenTerms,
    batch: SequenceBatch,
    loss: LossConfig,
    num_tokens: int,
    advantages_B: torch.Tensor,
    distill_weight: float,
) -> MixedLoss:
    """`mixed_batch_loss` from per-token terms at `batch.loss_mask()`'s cells (the fused
    objectives' `token_terms`: the student's log-probs and the distillation loss there)."""
    denom = max(num_tokens, 1)
    total = terms.any().new_zeros((), dtype=torch.float32)
    reward_term = distill_term = div_sum = 0.0
    if distill_weight < 1.0:
        lp = terms.student_logprobs
        mask = batch.loss_mask().to(lp.device)
        advantages = advantages_B.to(lp.device)[mask.nonzero(as_tuple=True)[0]]
        sampler_lp = None
        if batch.sampler_logprobs is not None:
            sampler_lp = batch.sampler_logprobs[:, batch.prompt_width :].to(lp.device)[mask]
        pg = policy_gradient_loss(
            lp, advantages, sampler_lp, loss.ratio_cap, loss.ratio_correction, loss.ratio_floor
        )
        pg = pg.sum() / denom
        total = total + (1.0 - distill_weight) * pg
        reward_term = (1.0 - distill_weight) * float(pg.detach())
    if distill_weight > 0.0:
        distill = terms.loss.sum() / denom
        total = total + distill_weight * distill
        distill_term = distill_weight * float(distill.detach())
        div_sum = float(terms.divergence.sum())
    return MixedLoss(total, div_sum, reward_term, distill_term)


class RewardStep:
    """Accumulates one optimizer step's reward terms over its student micro-batches."""

    def __init__(self, reward_fn, tokenizer, config):
        self.reward_fn, self.tokenizer, self.config = reward_fn, tokenizer, config
        self.rewards: list[torch.Tensor] = []
        self.reward_term = self.distill_term = 0.0

    @property
    def calls_teacher(self) -> bool:
        return self.config.reward.distill_weight > 0.0

    def batch_loss(self, mixed, rewards_B: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The micro-batch loss and divergence sum, like `opd.objectives.plain.batch_loss`;
        `mixed(advantages_B, distill_weight) -> MixedLoss` computes it from the advantages."""
        cfg = self.config
        advantages = group_advantages(rewards_B, cfg.sampling.n, cfg.reward.normalize)
        out = mixed(advantages, cfg.reward.distill_weight)
        self.rewards.append(rewards_B)
        self.reward_term += out.reward_term
        self.distill_term += out.distill_term
        return out.loss, out.divergence_sum

    def rewards_for(self, batch: SequenceBatch) -> torch.Tensor:
        return sequence_rewards(batch, self.tokenizer, self.reward_fn)

    def record(self) -> dict:
        """JSONL fields: mean reward of the step's student samples and both weighted terms."""
        rewards = torch.cat(self.rewards) if self.rewards else torch.zeros(0)
        return {
            # null in a step that drew no student batch (possible when source.lmbda < 1)
            "reward_mean": float(rewards.mean()) if rewards.numel() else None,
            "reward_samples": rewards.numel(),
            "reward_term": self.reward_term,
            "distill_term": self.distill_term,
            "distill_weight": self.config.reward.distill_weight,
        }


class RewardObjective:
    """A student micro-batch of RL + distillation: `(1-α)·PG(reward) + α·distill`.

    `distill` is the run's distillation objective: the plain one (student logits), or a
    fused one, whose `token_terms` give the student's log-probs and the distillation loss
    from hidden states (no `[tokens, vocab]` logits), inside any DDP/FSDP wrapper."""

    def __init__(self, run, distill):
        self.step = RewardStep(run.reward_fn, run.tokenizer, run.config)
        self.distill = distill

    def score(self, batch: SequenceBatch) -> Scored:
        rewards = self.step.rewards_for(batch)
        scores = self.distill.score(batch) if self.step.calls_teacher else Scored(None)
        return Scored((rewards, scores.value), scores.tokens_scored)

    def loss(self, batch: SequenceBatch, scored: Scored, num_tokens: int):
        rewards, scores = scored.value
        cfg = self.step.config.loss
        if hasattr(self.distill, "token_terms"):  # fused

            def mixed(advantages, a):
                terms = self.distill.token_terms(batch, scores, distill=a > 0, logprobs=a < 1)
                if a > 0:
                    report_divergence(self.distill.teacher, scores, batch, terms.divergence, None)
                return mixed_token_loss(terms, batch, cfg, num_tokens, advantages, a)

            return self.step.batch_loss(mixed, rewards)
        logits = completion_logits(self.distill.student, batch, self.distill.vocab_size)

        def mixed_plain(advantages, a):
            teacher = self.distill.teacher
            return mixed_batch_loss(logits, batch, scores, cfg, num_tokens, advantages, a, teacher)

        return self.step.batch_loss(mixed_plain, rewards)

    def record(self) -> dict:
        return self.step.record()
