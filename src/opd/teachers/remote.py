"""A teacher behind an HTTP server: `opd serve`, or a vLLM OpenAI-compatible server.

    opd train cfg.yaml teacher.kind=remote teacher.url=http://gpu-host:8000 \\
        teacher.api_key_env=OPD_TEACHER_TOKEN loss.estimator=topk loss.topk=32

Remote teachers return the log-prob of each given token and optionally the top-k log-probs
per position, never full logits, so they serve the `pg` objective and the `topk` estimator.
At connect the client reads `/opd/v1/info` and refuses a teacher whose tokenizer
fingerprint or vocabulary differs from the student's; a server without that endpoint is
taken for vLLM and spoken to through `/v1/completions` with `echo: true, max_tokens: 0,
prompt_logprobs: k` (its tokenizer cannot be checked, so a warning is logged).

Nothing a server answers is trusted: each answer is read within a byte bound derived from
the request and one deadline (`teacher.timeout_s`) that a trickling body cannot extend
(`opd.teachers.bounded_http`), then checked against the request (shapes, ids inside the
vocabulary, log-probs <= 0 and finite, top-k not all -inf: `opd.teachers.answer_checks`).
A bad answer is retried like a transport error and logged; none of it is ever used.

Requests run on a private asyncio loop in a background thread: `submit()` returns a
`concurrent.futures.Future` at once, so scoring one batch can overlap sampling the next;
`score_async()` awaits the same from any event loop; `score()` blocks. Transport errors,
timeouts, unusable answers, 408/429/5xx are retried with exponential backoff (`backoff_s * 2**attempt`, capped,
with jitter); when the server stays down, `TeacherUnavailable` names the URL and the run
stops with its last checkpoint intact. Other 4xx raise `TeacherRequestError` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import threading
import time
from concurrent.futures import Future

import httpx
import numpy as np
import torch

from opd.config.checks import teacher_need
from opd.data.batch import SequenceBatch
from opd.teachers.answer_checks import (
    answer_bytes_bound,
    check_info,
    check_models,
    unpack_completions,
    unpack_opd_score,
)
from opd.teachers.base import TeacherScores, check_need, check_untempered
from opd.teachers.bounded_http import INFO_BYTES, error_message, fetch, parse_json
from opd.teachers.checks import check_remote_config
from opd.teachers.errors import BadAnswer, TeacherRequestError, TeacherUnavailable
from opd.teachers.server.protocol import Limits

log = logging.getLogger("opd")

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteTeacher:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        protocol: str = "auto",  # auto | opd | vllm
        expected_fingerprint: str | None = None,
        expected_vocab_size: int | None = None,
        required_topk: int = 0,
        token_env: str = "OPD_TEACHER_TOKEN",
        max_seqs_per_request: int = 64,  # used when the server does not say (vLLM)
    ):
        if protocol not in ("auto", "opd", "vllm"):
            raise ValueError(f"protocol={protocol!r} must be auto, opd or vllm")
        self.url, self.token_env = url.rstrip("/"), token_env
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_seqs = max_seqs_per_request
        # scored positions x (k + 1) per request: the server's limit (opd), else opd's default
        self.max_logprobs: int = Limits.max_logprobs_per_request
        self.vocab_size = expected_vocab_size  # ids must stay below it (opd: the server's)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="opd-remote-teacher"
        )
        self._thread.start()
        self._client: httpx.AsyncClient | None = None
        try:
            self.info = self._call(self._connect(protocol))
            self._check(expected_fingerprint, expected_vocab_size, required_topk)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _connect(self, protocol: str) -> dict:
        self._client = httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            trust_env=False,  # a teacher is reached directly, never through an HTTP proxy
        )
        info = None
        if protocol != "vllm":
            parse = lambda body: check_info(self.url, body)  # noqa: E731
            info = await self._request("GET", "/opd/v1/info", ok404=True, parse=parse)
        if info is None and protocol == "opd":
            raise TeacherRequestError(f"{self.url} has no /opd/v1/info: it is not an opd server")
        if info is not None:
            limits = info["limits"]
            self.protocol, self.model = "opd", info["model"]
            self.max_seqs = limits["max_seqs_per_request"]
            self.max_logprobs = limits.get("max_logprobs_per_request") or self.max_logprobs
            self.vocab_size = info["vocab_size"]
            return info
        parse = lambda body: check_models(self.url, body)  # noqa: E731
        self.protocol, self.model = "vllm", await self._request("GET", "/v1/models", parse=parse)
        return {"model": self.model}

    def _check(self, fingerprint, vocab_size, topk) -> None:
        if self.protocol == "vllm":
            log.warning(
                "teacher %s has no /opd/v1/info (vLLM?): its tokenizer cannot be checked against "
                "the student's; make sure both use the same one",
                self.url,
            )
            return
        info = self.info
        if fingerprint and info["tokenizer_fingerprint"] != fingerprint:
            raise ValueError(
                f"teacher {info['model']!r} at {self.url} uses a different tokenizer than the "
                f"student (fingerprint {info['tokenizer_fingerprint']}, {info['vocab_size']} "
                f"tokens vs {fingerprint}, {vocab_size} tokens); token-level distillation needs "
                "a shared tokenizer"
            )
        if vocab_size is not None and info["vocab_size"] != vocab_size:
            raise ValueError(
                f"teacher at {self.url} has {info['vocab_size']} tokens, the student {vocab_size}"
            )
        if topk > info["limits"]["max_topk"]:
            raise ValueError(
                f"loss.topk={topk} but teacher server {self.url} allows at most "
                f"{info['limits']['max_topk']} (its --max-topk)"
            )

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._client is not None and self._thread.is_alive():
            self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP with retries -------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        ok404=False,
        *,
        parse=None,
        max_bytes: int = INFO_BYTES,
    ):
        """One request with retries; a 200 answer is read within `max_bytes` and the
        deadline, decoded, and passed through `parse` (which raises `BadAnswer`)."""
        start, last, tries = time.monotonic(), "", self.max_retries + 1
        for attempt in range(tries):
            try:
                status, raw = await fetch(
                    self._client,
                    method,
                    path,
                    server=self.url,
                    content=body,
                    headers=self._headers,
                    max_bytes=max_bytes,
                    deadline_s=self.timeout_s,
                )
                if status == 200:
                    data = parse_json(self.url, path, raw)
                    return parse(data) if parse is not None else data
            except httpx.TransportError as err:  # refused, reset, timed out, ...
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            except BadAnswer as err:  # none of it is used; the next attempt may be sound
                last = f"unusable answer: {err.problem}"
                log.warning("%s (attempt %d of %d)", err, attempt + 1, tries)
            else:
                if status == 404 and ok404:
                    return None
                message = error_message(raw)
                if status in (401, 403):
                    raise TeacherRequestError(
                        f"teacher server {self.url} refused the bearer token (HTTP "
                        f"{status}: {message}); set the environment variable "
                        f"{self.token_env} to the server's token"
                    )
                if status not in RETRY_STATUS:
                    raise TeacherRequestError(
                        f"teacher server {self.url}{path} answered HTTP {status}: {message}"
                    )
                last = f"HTTP {status}: {message}"
            if attempt < self.max_retries:
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                await asyncio.sleep(delay * (1 + 0.25 * random.random()))
        raise TeacherUnavailable(self.url, self.max_retries + 1, time.monotonic() - start, last)

    async def _post(self, path: str, payload: dict, parse, max_bytes: int):
        body = json.dumps(payload, separators=(",", ":")).encode()
        return await self._request("POST", path, body, parse=parse, max_bytes=max_bytes)

    # -- scoring ----------------------------------------------------------------------------

    def submit(self, batch: SequenceBatch, need: str, topk: int = 0) -> Future:
        """Start scoring `batch`; the returned future yields `TeacherScores`."""
        check_need(need, topk)
        if need == "logits":
            raise ValueError(
                "a remote teacher returns token and top-k log-probs, not full logits: use "
                "loss.estimator=topk or loss.objective=pg"
            )
        rows = sequences_of(batch)
        shape = (batch.size, batch.completion_width)
        k = topk if need == "topk" else 0
        coro = self._score(rows, shape, k, batch.input_ids.device, batch.num_target_tokens())
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    prefetch = submit

    async def score_async(self, batch: SequenceBatch, need: str, topk: int = 0) -> TeacherScores:
        return await asyncio.wrap_future(self.submit(batch, need, topk))

    def score(
        self, batch: SequenceBatch, need: str, topk: int = 0, temperature: float = 1.0
    ) -> TeacherScores:
        if need == "topk":
            check_untempered("remote", temperature)
        return self.submit(batch, need, topk).result()

    async def _score(self, rows, shape, k: int, device, n_tokens: int) -> TeacherScores:
        B, L = shape
        token = torch.zeros((B, L), dtype=torch.float32)
        # Positions past a row's completion are masked by the loss, but must stay finite.
        ids = torch.arange(k, dtype=torch.long).expand(B, L, k).clone()
        lps = torch.full((B, L, k), -math.log(k + 1), dtype=torch.float32)
        every = self.protocol == "vllm"  # vLLM scores every position, not only from start
        chunks = request_chunks(rows, k, self.max_seqs, self.max_logprobs, every)
        parts = await asyncio.gather(*(self._score_chunk(c, k) for c in chunks))
        for chunk, part in zip(chunks, parts):
            for (r, _seq, _start), (tok, top_ids, top_lps) in zip(chunk, part):
                n = len(tok)
                token[r, :n] = torch.from_numpy(np.asarray(tok, dtype=np.float32))
                if k:
                    ids[r, :n] = torch.from_numpy(np.asarray(top_ids, dtype=np.int64))
                    lps[r, :n] = torch.from_numpy(np.asarray(top_lps, dtype=np.float32))
        scores = TeacherScores(token_logprobs=token.to(device), tokens_scored=n_tokens)
        if k:
            scores.topk_ids, scores.topk_logprobs = ids.to(device), lps.to(device)
        return scores

    async def _score_chunk(self, rows, k: int) -> list[tuple]:
        """Checked `(token_logprobs, topk_ids, topk_logprobs)` per row of one request."""
        seqs, starts = [r[1] for r in rows], [r[2] for r in rows]
        vocab = self.vocab_size
        if self.protocol == "opd":
            want = [len(s) - st for s, st in zip(seqs, starts)]
            return await self._post(
                "/opd/v1/score",
                {"sequences": seqs, "start": starts, "topk": k},
                lambda body: unpack_opd_score(self.url, body, want, k, vocab),
                answer_bytes_bound(sum(want), len(seqs), k, "opd"),
            )
        payload = {
            "model": self.model,
            "prompt": seqs,
            "max_tokens": 0,
            "echo": True,
            "prompt_logprobs": k,
            "return_token_ids": True,  # lets vLLM skip detokenizing the echoed prompt
        }
        positions = sum(len(s) for s in seqs)  # every position is scored, and echoed
        return await self._post(
            "/v1/completions",
            payload,
            lambda body: unpack_completions(self.url, body, seqs, starts, k, vocab),
            answer_bytes_bound(positions, len(seqs), k, "vllm"),
        )


def request_chunks(
    rows: list, k: int, max_seqs: int, max_logprobs: int | None, every: bool = False
) -> list[list]:
    """Consecutive groups of `(row, seq, start)` within the server's per-request limits:
    at most `max_seqs` sequences and `max_logprobs` scored positions x (k + 1) (`every`:
    the server scores every position after the first, as vLLM's prompt scoring does)."""
    chunks, current, values = [], [], 0
    for row in rows:
        n = (len(row[1]) - (1 if every else row[2])) * (k + 1)
        full = len(current) >= max_seqs or (max_logprobs and values + n > max_logprobs)
        if current and full:
            chunks.append(current)
            current, values = [], 0
        current.append(row)
        values += n
    return [*chunks, current] if current else chunks


def sequences_of(batch: SequenceBatch) -> list[tuple[int, list[int], int]]:
    """`(row, real tokens, index of the first completion token)` for rows with a completion."""
    ids, attn, P = batch.input_ids.cpu(), batch.attention_mask.cpu().bool(), batch.prompt_width
    rows = []
    for r in range(batch.size):
        p, c = int(attn[r, :P].sum()), int(attn[r, P:].sum())
        if not (attn[r, P - p : P].all() and attn[r, P : P + c].all()):
            raise ValueError(f"row {r}: prompt must be left-padded and completion right-padded")
        if c:
            rows.append((r, ids[r, P - p : P + c].tolist(), p))
    return rows


def remote_teacher_from_config(config, tokenizer) -> RemoteTeacher:
    """The `teacher.kind: remote` of a run config, checked against the student's tokenizer."""
    from opd.modeling.hf import tokenizer_fingerprint

    check_remote_config(config)
    t = config.teacher
    return RemoteTeacher(
        t.url,
        token=os.environ.get(t.api_key_env) or None,
        timeout_s=t.timeout_s,
        max_retries=t.max_retries,
        token_env=t.api_key_env,
        expected_fingerprint=tokenizer_fingerprint(tokenizer),
        expected_vocab_size=len(tokenizer),
        required_topk=teacher_need(config.loss)[1],
    )
