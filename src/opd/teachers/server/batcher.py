"""Dynamic batching for the teacher server: many requests, one padded forward.

Requests wait in an asyncio queue. The batcher takes the first, then keeps collecting for
up to `wait_ms` or until `max_batch_tokens` tokens are queued, and runs one forward for all
of them in a single worker thread (so the event loop keeps accepting requests meanwhile;
whatever arrives during a forward forms the next batch). Sequences are sorted by length
and packed so no forward holds more than `max_batch_tokens` padded tokens.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from opd.teachers.server.protocol import RequestError, ScoreWork

ROWS_PER_SOFTMAX = 2048  # bounds the float32 [rows, V] copy made for log_softmax


def _pack(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that (longest in group) x (group size) <= max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, current = [], []
    for i in order:  # ascending, so the newest member is the longest
        if current and lengths[i] * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _score_group(model, vocab_size: int, seqs, starts, topk: int, ranks: bool, device) -> list:
    """One left-padded forward; log-probs of tokens `seq[start:]` of each sequence."""
    B, T = len(seqs), max(len(s) for s in seqs)
    counts = [len(s) - st for s, st in zip(seqs, starts)]
    K = max(counts)
    if K == 0:
        return [_empty(topk, ranks) for _ in seqs]
    ids = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, T - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, T - len(s) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=K + 1,  # the LM head never runs on prompt positions we do not score
        use_cache=False,
    )
    logits = out.logits[:, :-1, :vocab_size].reshape(B * K, -1)
    # Row r's scored positions are the last counts[r] of the K kept columns.
    rows = torch.cat([r * K + torch.arange(K - n, K) for r, n in enumerate(counts)]).to(device)
    targets = torch.tensor(
        [t for s, st in zip(seqs, starts) for t in s[st:]], dtype=torch.long, device=device
    )
    token_lp, top_ids, top_lp, rank = [], [], [], []
    for lo in range(0, len(rows), ROWS_PER_SOFTMAX):
        logp = torch.log_softmax(logits[rows[lo : lo + ROWS_PER_SOFTMAX]].float(), dim=-1)
        tok = logp.gather(-1, targets[lo : lo + ROWS_PER_SOFTMAX, None])
        token_lp.append(tok.squeeze(-1))
        if topk:
            values, idx = logp.topk(min(topk, logp.shape[-1]), dim=-1)
            top_lp.append(values)
            top_ids.append(idx)
        if ranks:  # vLLM's rank: how many tokens score at least as high
            rank.append((logp >= tok).sum(-1))
    token_lp = torch.cat(token_lp).cpu().numpy()
    top_ids = torch.cat(top_ids).to(torch.int32).cpu().numpy() if topk else None
    top_lp = torch.cat(top_lp).cpu().numpy() if topk else None
    rank = torch.cat(rank).cpu().numpy() if ranks else None
    results, at = [], 0
    for n in counts:
        res = _empty(topk, ranks)
        res["token_logprobs"] = token_lp[at : at + n]
        if topk:
            res["topk_ids"], res["topk_logprobs"] = top_ids[at : at + n], top_lp[at : at + n]
        if ranks:
            res["ranks"] = rank[at : at + n]
        results.append(res)
        at += n
    return results


def _empty(topk: int, ranks: bool) -> dict:
    return {
        "token_logprobs": np.zeros(0, np.float32),
        "topk_ids": np.zeros((0, topk), np.int32),
        "topk_logprobs": np.zeros((0, topk), np.float32),
        "ranks": np.zeros(0, np.int64) if ranks else None,
    }


@torch.inference_mode()
def score_sequences(
    model, vocab_size: int, seqs, starts, topk: int, ranks: bool, max_batch_tokens: int, device
) -> list[dict]:
    """Per sequence: `token_logprobs [n]`, `topk_ids/topk_logprobs [n, k]`, `ranks [n]`.

    The plain (unbatched-API) scoring function; the server's batcher and the tests call it.
    """
    results: list = [None] * len(seqs)
    for group in _pack([len(s) for s in seqs], max_batch_tokens):
        part = _score_group(
            model,
            vocab_size,
            [seqs[i] for i in group],
            [starts[i] for i in group],
            topk,
            ranks,
            device,
        )
        for i, res in zip(group, part):
            results[i] = res
    return results


@dataclass
class _Job:
    work: ScoreWork
    future: asyncio.Future
    tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = self.work.tokens


class Batcher:
    """Collects `ScoreWork` from concurrent requests into padded forwards (see module doc)."""

    def __init__(
        self,
        model,
        vocab_size: int,
        *,
        max_batch_tokens: int,
        wait_ms: float = 2.0,
        max_queued_tokens: int | None = None,
        device=None,
    ):
        self.model, self.vocab_size = model, vocab_size
        self.max_batch_tokens, self.wait_s = max_batch_tokens, wait_ms / 1000
        self.max_queued_tokens = max_queued_tokens or 8 * max_batch_tokens
        self.device = device or next(model.parameters()).device
        self.queued_tokens = 0
        self.batches = 0  # forwards run so far (for tests and /opd/v1/info)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-teacher")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="opd-batcher")

    async def stop(self) -> None:
        """Finish every queued job, then stop."""
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None
        self._pool.shutdown(wait=True)

    async def submit(self, work: ScoreWork) -> list[dict]:
        if self._task is None or self._task.done():
            raise RequestError(503, "the teacher server is shutting down")
        if self.queued_tokens + work.tokens > self.max_queued_tokens and self.queued_tokens:
            raise RequestError(
                503, f"server busy: {self.queued_tokens} tokens already queued; retry later"
            )
        job = _Job(work, asyncio.get_running_loop().create_future())
        self.queued_tokens += job.tokens
        await self._queue.put(job)
        return await job.future

    async def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The batch that starts with `first`, and whether the stop signal was seen."""
        jobs, tokens = [first], first.tokens
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while tokens < self.max_batch_tokens:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            tokens += job.tokens
        return jobs, False

    def _forward(self, jobs: list[_Job]) -> list[list[dict]]:
        seqs = [s for j in jobs for s in j.work.seqs]
        starts = [s for j in jobs for s in j.work.starts]
        topk = max(j.work.topk for j in jobs)
        ranks = any(j.work.ranks for j in jobs)
        flat = score_sequences(
            self.model,
            self.vocab_size,
            seqs,
            starts,
            topk,
            ranks,
            self.max_batch_tokens,
            self.device,
        )
        out, at = [], 0
        for j in jobs:
            part = flat[at : at + len(j.work.seqs)]
            at += len(j.work.seqs)
            k = j.work.topk
            for res in part:  # each job gets exactly the k it asked for
                res["topk_ids"], res["topk_logprobs"] = (
                    res["topk_ids"][:, :k],
                    res["topk_logprobs"][:, :k],
                )
            out.append(part)
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            jobs, stopping = await self._collect(first)
            try:
                results = await loop.run_in_executor(self._pool, self._forward, jobs)
            except Exception as err:  # e.g. out of memory: fail these requests, keep serving
                results = [err] * len(jobs)
            self.batches += 1
            for job, res in zip(jobs, results):
                self.queued_tokens -= job.tokens
                if job.future.done():  # the client went away
                    continue
                if isinstance(res, Exception):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)
