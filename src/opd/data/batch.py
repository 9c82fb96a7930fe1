"""The one sequence layout every part of the loop shares.

A batch holds B prompt+completion sequences in a `[B, T]` grid: prompts are left-padded
to a common width P, completions start at column P for every row and are right-padded.
That makes "the completion" the same columns for every row, which keeps the student,
any teacher (with another prompt, for self-distillation) and the sampler aligned.

Predictions are *completion-aligned*: position j of a `[B, L]` array (L = T - P) is about
completion token `input_ids[:, P + j]`, predicted from the tokens before it. Prompt
positions are never scored, so no model computes logits for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

SOURCES = ("dataset", "teacher", "student")


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens (prompt and completion)
    completion_mask: torch.Tensor  # [B, T] 1 on supervised completion tokens, EOS included
    prompt_width: int  # P: completions start at this column
    source: str = "dataset"
    # log q(token) of each completion token under the policy that sampled it ([B, T],
    # zeros elsewhere); None for fixed dataset text. Used for importance ratios.
    sampler_logprobs: torch.Tensor | None = None
    rows: list[dict] = field(default_factory=list)  # the dataset rows, for rewards/context

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"batch source {self.source!r} not in {SOURCES}")
        shape = self.input_ids.shape
        for name in ("attention_mask", "completion_mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} shape {tuple(getattr(self, name).shape)} != input_ids {tuple(shape)}"
                )

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def position_ids(self) -> torch.Tensor:
        """Positions that skip left padding, as Hugging Face `generate` computes them."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def completion_width(self) -> int:
        return self.input_ids.shape[1] - self.prompt_width

    def completion_ids(self) -> torch.Tensor:
        """`[B, L]` the token each completion-aligned prediction is about."""
        return self.input_ids[:, self.prompt_width :]

    def loss_mask(self) -> torch.Tensor:
        """`[B, L]` bool: completion positions that are supervised."""
        return self.completion_mask[:, self.prompt_width :].bool()

    def num_target_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    def to(self, device: torch.device | str) -> SequenceBatch:
        move = {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "completion_mask": self.completion_mask.to(device),
        }
        if self.sampler_logprobs is not None:
            move["sampler_logprobs"] = self.sampler_logprobs.to(device)
        return replace(self, **move)


def assemble(
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_id: int,
    source: str = "dataset",
    completion_logprobs: list[list[float]] | None = None,
    rows: list[dict] | None = None,
) -> SequenceBatch:
    """Lay out token lists in the shared grid. Every completion token is supervised."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every sequence needs at least one prompt token")
    width = max(len(p) for p in prompts)
    length = max(1, max(len(c) for c in completions))
    # Whole rows as lists, one tensor each (not a slice assignment per row: ~1 ms a batch)
    ids = torch.tensor(
        [[pad_id] * (width - len(p)) + list(p) + list(c) + [pad_id] * (length - len(c))
         for p, c in zip(prompts, completions, strict=True)],
        dtype=torch.long,
    )  # fmt: skip
    columns = torch.arange(width + length)
    starts = torch.tensor([width - len(p) for p in prompts])[:, None]
    ends = torch.tensor([width + len(c) for c in completions])[:, None]
    attn = ((columns >= starts) & (columns < ends)).long()
    comp = ((columns >= width) & (columns < ends)).long()
    logq = None
    if completion_logprobs is not None:
        logq = torch.tensor(
            [[0.0] * width + list(lq) + [0.0] * (length - len(c))
             for lq, c in zip(completion_logprobs, completions, strict=True)],
            dtype=torch.float32,
        )  # fmt: skip
    return SequenceBatch(ids, attn, comp, width, source, logq, list(rows or []))
