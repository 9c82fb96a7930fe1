"""Supervised pre-training of the demo's teacher and student, and greedy decoding.

Plain next-token cross-entropy on prompt + completion, loss on the completion and EOS.
With `corrupt_prob > 0` (the teacher), that share of the examples gets one or two step
values replaced by wrong digits (`opd.cli.demo.task.corrupt`); the replaced digits are left
out of the loss and every other target stays the clean one, so the model learns to
continue correctly from a prefix that holds a mistake, never to make one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from opd.cli.demo.task import accuracy, corrupt

Pair = tuple[list[int], list[int], list[bool]]  # prompt ids, completion ids + EOS, loss mask


def char_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` under the demo's character tokenizer (one token per character)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != len(text):
        raise ValueError(f"the demo needs a one-token-per-character tokenizer; {text!r} -> {ids}")
    return ids


def encode_example(
    tokenizer: PreTrainedTokenizerBase, example: dict, rng: random.Random | None = None
) -> Pair:
    """One training pair; corrupted (with `rng`) or clean (without)."""
    completion, masked = example["completion"], []
    if rng is not None:
        completion, masked = corrupt(example, rng)
    comp = [*char_ids(tokenizer, completion), tokenizer.eos_token_id]
    mask = [True] * len(comp)
    for offset in masked:
        mask[offset] = False
    return char_ids(tokenizer, example["prompt"]), comp, mask


def collate_right_padded(
    pairs: Sequence[Pair], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`input_ids_BT`, `attention_mask_BT`, `loss_mask_BT` (the completion targets kept).

    Right padding keeps every real token at its natural position 0..len-1, so the default
    position ids are correct and causal attention never looks at the padding.
    """
    width = max(len(p) + len(c) for p, c, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    loss = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (p, c, m) in enumerate(pairs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        loss[i, len(p) : n] = torch.tensor(m, dtype=torch.bool)
    return ids, attn, loss


def completion_nll(model, ids_BT, attn_BT, loss_BT) -> torch.Tensor:
    """Mean next-token cross-entropy over the kept completion (and EOS) targets."""
    logits = model(input_ids=ids_BT, attention_mask=attn_BT).logits[:, :-1].float()
    targets, mask = ids_BT[:, 1:], loss_BT[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def pretrain_causal_lm(
    model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    corrupt_prob: float = 0.0,
    weight_decay: float = 0.01,
    on_step: Callable[[int, float], None] | None = None,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 0,
) -> list[float]:
    """AdamW, linear warm-up (5%) then cosine decay to 10% of `lr` over `steps`.

    Batches are drawn with replacement from `examples` by a seeded generator. Every
    `check_every` steps `stop(step)` is called (model in eval mode) and training ends if it
    returns True. `on_step(step, loss)` after each step (a progress bar). Returns the
    per-step losses (their count is the number of steps taken).
    """
    clean = [encode_example(tokenizer, e) for e in examples]
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(len(clean), (batch_size,), generator=gen).tolist()
        pairs = [
            encode_example(tokenizer, examples[i], rng)
            if corrupt_prob and rng.random() < corrupt_prob
            else clean[i]
            for i in idx
        ]
        batch = collate_right_padded(pairs, tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = completion_nll(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if stop is not None and check_every and (step + 1) % check_every == 0:
            model.eval()
            done = stop(step + 1)
            model.train()
            if done:
                break
    model.eval()
    return losses


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (special tokens stripped) via `model.generate` on left-padded prompts."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[i : i + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def greedy_accuracy(
    model,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    max_new_tokens: int,
    batch_size: int = 256,
) -> float:
    """Exact-match accuracy of greedy completions on `examples`."""
    prompts = [e["prompt"] for e in examples]
    texts = greedy_generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return accuracy(texts, examples)
