"""KV-cached sampling of completions from a causal LM, with the sampler's log-probs.

A lean loop instead of `generate`: one prefill, then one token per step through the KV
cache, recording log q(token) under the distribution actually sampled from (after
temperature, top-k, top-p) so the loss can form importance ratios. Rows stop at EOS
(which is kept and supervised) or when a stop string appears (kept as generated).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from opd.sampling.draw import draw_tokens, draw_uniforms
from opd.sampling.stops import end_ids_tensor, mark_stop_strings


@dataclass
class Rollout:
    completions: list[list[int]]  # sampled tokens per row, EOS/stop text included
    logprobs: list[list[float]]  # log q of each sampled token
    finished: list[bool]  # ended by EOS or a stop string (False: hit max_new_tokens)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def process_logits(
    logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Log-probs of the sampling distribution: temperature, then top-k, then top-p."""
    logits = logits_BV.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.log_softmax(logits, dim=-1)


def to_rollout(tokens, logq, lengths, done) -> Rollout:
    """Per-row lists from the `[B, max_new_tokens]` buffers, cut at each row's length."""
    n = lengths.tolist()
    rows_tokens, rows_logq = tokens.tolist(), logq.tolist()
    return Rollout(
        completions=[rows_tokens[i][: n[i]] for i in range(len(n))],
        logprobs=[rows_logq[i][: n[i]] for i in range(len(n))],
        finished=done.tolist(),
    )


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: `cache` in recent transformers, which deprecates
    `past_key_values` (a FutureWarning on every call), `past_key_values` before that."""
    # A PEFT wrapper's forward takes **kwargs and passes them on: ask the model it wraps.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()  # callers sample under no_grad too: never a graph through the decode
def sample(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: tuple[str, ...] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    all_finished=None,
) -> Rollout:
    """Sample one completion per prompt. `temperature == 0` is greedy (log q = 0).

    `eos_id`: the id, or every id, that ends a completion (kept and supervised).

    `all_finished(done) -> bool`, for a model sharded over processes (FSDP): every forward
    all-gathers weights, so all ranks keep stepping until every rank's rows are done."""
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode completions")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {cache_keyword(model): DynamicCache()}
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        **cache,
        use_cache=True,
        logits_to_keep=1,
    )
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logq = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ends = end_ids_tensor(eos_id, device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    next_pos = positions[:, -1] + 1
    for t in range(max_new_tokens):
        logits = out.logits[:, -1, :vocab_size]
        if temperature == 0.0:
            token = logits.argmax(-1)
            token_logq = torch.zeros(B, device=device)
        else:
            logp = process_logits(logits, temperature, top_k, top_p)
            token = draw_tokens(logp.exp(), draw_uniforms(B, generator, device))
            token_logq = logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens[:, t] = token
        logq[:, t] = torch.where(done, torch.zeros_like(token_logq), token_logq)
        lengths += (~done).long()
        done |= torch.isin(token, ends)
        if stop:
            mark_stop_strings(done, tokens, t, range(B), stop, tokenizer)
        finished = bool(done.all())
        if all_finished is not None:
            finished = all_finished(finished)
        if finished or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=mask,
            position_ids=next_pos.unsqueeze(-1),
            **cache,
            use_cache=True,
        )
        next_pos = next_pos + 1
    model.train(was_training)
    return to_rollout(tokens, logq, lengths, done)
