"""The fast sampler: `opd.sampling.reference.sample` on a static KV cache, same tokens.

`sample_fast` returns what `sample` returns for the same generator state: identical tokens
(greedy and sampled) and the same log q. It draws its randomness the way `sample` does:
one uniform per row of the batch each step (`opd.sampling.draw.draw_tokens`), of which it uses
the rows it still decodes. What it saves per token:

* no `DynamicCache` growth (`torch.cat` per layer per token) and no attention-mask `cat`:
  keys/values go into a preallocated grid, a boolean row marks valid cells;
* no Hugging Face forward wrapper (mask building, output records): one embedding, the
  layer loop and the head (`opd.modeling.lean_decoder.LeanDecoder`);
* rows that have finished leave the batch once they are a quarter of it, so the tail of a
  long generation runs on the rows still going.

It runs the hand-written decoder of `opd.modeling.lean`, so it is opt-in
(`sampling.engine=lean`) and the first batch each model meets here is checked against the
model's own forward (`opd.modeling.lean_check.check_decoder`; a mismatch stops the run).
Models outside `opd.modeling.lean.lean_supported`, and callers that must step in lock-step
across processes (`all_finished`, FSDP), get `sample` itself.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch

from opd.modeling.lean import lean_supported
from opd.modeling.lean_check import check_decoder
from opd.modeling.lean_decoder import GraphedStep, LeanDecoder
from opd.sampling.draw import draw_tokens, draw_uniforms
from opd.sampling.reference import Rollout, left_pad, process_logits, sample, to_rollout
from opd.sampling.stops import end_ids_tensor, mark_stop_strings

PACK_HEAD_FROM = 16  # new tokens from which the decoder packs its head (`decode_head`)

log = logging.getLogger("opd")


# Inference mode, not just no_grad: a step of small kernels runs ~10% faster without
# autograd's version counters and view tracking; nothing made here leaves as a tensor (the
# rollout is lists), so no inference tensor can reach a later backward.
@torch.inference_mode()
def sample_fast(
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
    compact_at: float = 0.25,
    static: bool = False,
) -> Rollout:
    """Same contract as `opd.sampling.reference.sample`.

    `compact_at`: drop finished rows from the batch once they are at least this fraction
    of it. `static` (`sampling.cuda_graphs`): fixed shapes instead, every step over the whole
    cache width and all rows, replayed as one CUDA graph on CUDA (launch overhead, not
    arithmetic, bounds small-batch decoding on a GPU). Off by default: no GPU run has
    checked the graph path yet."""
    kw = dict(
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        pad_id=pad_id,
        vocab_size=vocab_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=stop,
        tokenizer=tokenizer,
        generator=generator,
    )
    if all_finished is not None:
        return sample(model, prompts, **kw, all_finished=all_finished)
    if not lean_supported(model):
        return sample(model, prompts, **kw)
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode completions")
    # No eval()/train() around it: the lean decoder computes the same in either mode (the
    # models it supports have no dropout), and each switch of a transformers model costs
    # about a millisecond (its kernels hook). The check's HF forward runs in eval mode.
    return _decode(model, prompts, **kw, compact_at=compact_at, static=static)


def _decode(model, prompts, *, max_new_tokens, eos_id, pad_id, vocab_size, temperature, top_k,
            top_p, stop, tokenizer, generator, compact_at, static) -> Rollout:  # fmt: skip
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    check_decoder(model, ids, mask, vocab_size)
    # The last sampled token is never fed back: the cache needs P + max_new_tokens - 1 columns.
    # Packing the head costs about four unpacked head products and saves a third of each.
    pack = max_new_tokens >= PACK_HEAD_FROM
    decoder = LeanDecoder(model, vocab_size, B, P + max_new_tokens - 1, pack_head=pack)
    step = decoder.step
    if static:
        step = _static_step(model, decoder, B)
    logits = decoder.prefill(ids, mask)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logq = torch.zeros((B, max_new_tokens), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    rows = None  # batch row of each cache row once finished rows have left; None: all rows
    next_pos = mask.sum(-1)  # position of the first new token: the prompt length
    plain = top_k == 0 and top_p == 1.0
    ends = end_ids_tensor(eos_id, device)
    for t in range(max_new_tokens):
        if temperature == 0.0:
            token = logits.argmax(-1)
            token_logq = torch.zeros(token.shape, device=device)
        else:
            # `sample` draws B uniforms a step: so do we, and use the rows still decoding.
            uniform = draw_uniforms(B, generator, device)
            uniform = uniform if rows is None else uniform[rows]
            if plain and temperature == 1.0:  # process_logits' other steps are identities here
                # one row-wise kernel for the probabilities (not log-softmax, then exp); the
                # drawn tokens' log-probs from theirs (never 0: a zero is never drawn)
                probs = torch.softmax(logits.float(), dim=-1)
                token = draw_tokens(probs, uniform)
                token_logq = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1).log()
            else:
                logp = process_logits(logits, temperature, top_k, top_p)
                token = draw_tokens(logp.exp(), uniform)
                token_logq = logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        dead = done if rows is None else done[rows]
        live = ~dead
        token = token.masked_fill(dead, pad_id)
        token_logq = token_logq.masked_fill(dead, 0.0)
        ended = live & torch.isin(token, ends)
        if rows is None:
            tokens[:, t], logq[:, t] = token, token_logq
            lengths += live
            done |= ended
        else:
            tokens[rows, t], logq[rows, t] = token, token_logq
            lengths[rows] += live
            done[rows] |= ended
        if stop:
            live_rows = range(B) if rows is None else rows.tolist()
            mark_stop_strings(done, tokens, t, live_rows, stop, tokenizer)
        if t == max_new_tokens - 1:
            break
        still = ~(done if rows is None else done[rows])
        n_still = int(still.sum())
        if n_still == 0:
            break
        if not static and n_still <= (1 - compact_at) * still.numel():
            keep = still.nonzero().squeeze(1)
            decoder.keep(keep)
            rows = keep if rows is None else rows[keep]
            token, next_pos = token[keep], next_pos[keep]
        logits = step(token, next_pos, P + t)
        next_pos = next_pos + 1
    return to_rollout(tokens, logq, lengths, done)


class GraphChecks:
    """Which CUDA-graph decode steps were checked against eager, per model and shape.

    A graph replays the kernels it captured for one model at one (batch, cache width, dtype,
    device); a replay that agreed for one of these says nothing about another, so each is
    checked on its first replay (`"verified"`) and, if it ever disagrees or fails to
    capture, runs eagerly from then on (`"disabled"`). Models are held weakly."""

    def __init__(self):
        self._state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def key(decoder: LeanDecoder, batch: int) -> tuple:
        bias = decoder.key_bias
        return (batch, decoder.width, bias.dtype, str(bias.device))

    def get(self, model, key: tuple) -> str | None:
        return self._state.get(model, {}).get(key)

    def set(self, model, key: tuple, state: str) -> None:
        self._state.setdefault(model, {})[key] = state


_GRAPHS = GraphChecks()


def _static_step(model, decoder: LeanDecoder, batch: int, checks: GraphChecks = _GRAPHS):
    """The fixed-shape step: replayed as a CUDA graph on CUDA, else run as it is."""
    column = torch.zeros(1, dtype=torch.long, device=decoder.key_bias.device)

    def eager(tokens, positions, col: int):
        column.fill_(col)
        return decoder.step_static(tokens, positions, column)

    key = checks.key(decoder, batch)
    if decoder.key_bias.device.type != "cuda" or checks.get(model, key) == "disabled":
        return eager
    try:
        graphed = GraphedStep(decoder, batch)
    except RuntimeError as err:  # capture unsupported here: the same step, launched eagerly
        log.warning("CUDA graph capture of the decode step failed (%s); running it eagerly", err)
        checks.set(model, key, "disabled")
        return eager
    return checked_replay(graphed, eager, checks, model, key)


def checked_replay(graphed, eager, checks: GraphChecks, model, key: tuple):
    """`graphed` (a replayed step) once checked against `eager` for this model and shape."""

    def run(tokens, positions, col: int):
        state = checks.get(model, key)
        if state == "disabled":
            return eager(tokens, positions, col)
        logits = graphed(tokens, positions, col)
        if state == "verified":
            return logits
        ref = eager(tokens, positions, col)  # cache writes are idempotent: same column
        if (logits - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3:
            checks.set(model, key, "verified")
        else:
            log.warning(
                "CUDA graph replay of the decode step disagrees with eager (batch %d, cache "
                "width %d); running this shape eagerly",
                *key[:2],
            )
            checks.set(model, key, "disabled")
        return ref

    return run
