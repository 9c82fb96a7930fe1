"""A teacher behind an HTTP server: `opd serve`, or a vLLM OpenAI-compatible server.

    opd train cfg.yaml teacher.kind=remote teacher.url=http://gpu-host:8000 \\
        teacher.api_key_env=OPD_TEACHER_TOKEN loss.estimator=topk loss.topk=32

Remote teachers return the log-prob of each given token and optionally the top-k log-probs
per position, never full logits, so they serve the `pg` objective and the `topk` estimator.
At connect the client reads `/opd/v1/info` and refuses a teacher whose tokenizer
fingerprint or vocabulary differs from the student's; a server without that endpoint is
taken for vLLM and spoken to through `/v1/completions` with `echo: true, max_tokens: 0,
prompt_logprobs: k`, its tokenizer checked by `/tokenize` of a probe text. A teacher with
another tokenizer is named by `cross_tokenizer.teacher_tokenizer` and checked the same way
(`opd.teachers.registry` wraps it for alignment).

`teacher.urls: [...]` names replicas of one teacher (`opd.teachers.replicas`): a micro-batch
is split over the replicas in rotation (about equal positions each) and a failed request
moves to another; replicas must agree at connect on their identity and on the log-probs of
a fixed probe sequence (within SAME_MODEL_TOLERANCE).

Nothing a server answers is trusted: each answer is read within a byte bound derived from
the request and one deadline (`teacher.timeout_s`) that a trickling body cannot extend
(`opd.teachers.bounded_http`), then checked against the request (`opd.teachers.answer_checks`);
a bad answer is a failure of that server, like a transport error, and none of it is used.

Requests run on a private asyncio loop in a background thread: `submit()` returns a
`concurrent.futures.Future` at once, so scoring one batch can overlap sampling the next or
a backward (`opd.run.score_ahead`); `score()` blocks. Transport errors, timeouts, unusable
answers and 408/429/5xx fail over to another replica, or with one server are retried with
exponential backoff (`backoff_s * 2**attempt`, capped, with jitter); when every server stays
down, `TeacherUnavailable` names them and the run stops with its last checkpoint intact.
Other 4xx raise `TeacherRequestError` at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import threading
from concurrent.futures import Future

import httpx
import numpy as np
import torch

from opd.config.checks import teacher_need
from opd.data.batch import SequenceBatch
from opd.teachers.answer_checks import answer_bytes_bound, unpack_completions, unpack_opd_score
from opd.teachers.base import TeacherScores, check_need, check_untempered
from opd.teachers.checks import check_remote_config
from opd.teachers.errors import TeacherRequestError
from opd.teachers.replicas import Replica, ReplicaPool, positions, spread
from opd.teachers.server.protocol import Limits
from opd.teachers.server_dtype import report_dtype, served_dtype

log = logging.getLogger("opd")

# Replicas of one teacher must agree on these log-probs (ids in every vocabulary) within
# SAME_MODEL_TOLERANCE: far above the batch-shape noise of one model in float32 or bfloat16
# over 8 tokens, far below the gap between two different checkpoints.
PROBE_SEQUENCE = [1, 2, 3, 4, 5, 6, 7, 8]
SAME_MODEL_TOLERANCE = 0.05
# Text whose tokens tell tokenizers apart: digits, accents, CJK, an emoji, spaces, a newline.
TOKENIZE_PROBE = "The 2024 café: 日本語 🙂  naïve\n\tx=3.14159"


class RemoteTeacher:
    """`url`: one server, or a list of replicas of one teacher (`opd.teachers.replicas`)."""

    overlaps = True  # scoring waits on the network: the loop may run it beside a backward

    def __init__(
        self,
        url: str | list[str],
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
        probe_interval_s: float = 5.0,
        tokenizer=None,  # the tokenizer the server must use: checked by /tokenize (vLLM)
    ):
        if protocol not in ("auto", "opd", "vllm"):
            raise ValueError(f"protocol={protocol!r} must be auto, opd or vllm")
        urls = [u.rstrip("/") for u in ([url] if isinstance(url, str) else url)]
        self.url = ", ".join(urls)  # what messages name
        self.timeout_s, self.max_seqs = timeout_s, max_seqs_per_request
        # scored positions x (k + 1) per request: the server's limit (opd), else opd's default
        self.max_logprobs: int = Limits.max_logprobs_per_request
        self.vocab_size = expected_vocab_size  # ids must stay below it (opd: the server's)
        self._probe_reference: tuple[str, np.ndarray] | None = None
        self._failovers_logged = 0
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="opd-remote-teacher"
        )
        self._thread.start()
        self.pool = ReplicaPool(
            urls,
            self._client,
            headers,
            token_env=token_env,
            timeout_s=timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            probe_interval_s=probe_interval_s,
        )
        try:
            self.info = self._call(self._connect(protocol))
            self._check(expected_fingerprint, expected_vocab_size, required_topk)
            if self.protocol == "vllm":
                self._call(self._check_tokenize(tokenizer))
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _client(self, url: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            trust_env=False,  # a teacher is reached directly, never through an HTTP proxy
        )

    async def _connect(self, protocol: str) -> dict:
        self.pool.verify = self._same_scores if len(self.pool.replicas) > 1 else None
        info = await self.pool.connect(protocol)
        self.protocol, self.model = self.pool.protocol, info["model"]
        report_dtype(self.url, self.model, await served_dtype(self.pool, self.protocol, info))
        if self.protocol == "vllm":
            return info
        self.vocab_size = info["vocab_size"]
        self.max_logprobs = info["limits"].get("max_logprobs_per_request") or self.max_logprobs
        # chunks are cut before a replica is chosen: within every replica's limit
        self.max_seqs = min(
            r.info["limits"]["max_seqs_per_request"] for r in self.pool.replicas if r.info
        )
        return info

    async def _same_scores(self, replica: Replica) -> None:
        """Refuse a replica whose log-probs of a fixed probe differ from the first one's:
        another checkpoint behind the same name and tokenizer."""
        (tok, _, _), *_ = await self._score_chunk(replica, [(0, PROBE_SEQUENCE, 1)], 0)
        tok = np.asarray(tok, dtype=np.float64)
        if self._probe_reference is None:
            self._probe_reference = (replica.url, tok)
            return
        url, want = self._probe_reference
        gap = float(np.abs(tok - want).max())
        if not gap <= SAME_MODEL_TOLERANCE:
            raise ValueError(
                f"teacher replica {replica.url} scores a probe sequence differently from {url} "
                f"(max |difference of log-probs| {gap:.3g} > {SAME_MODEL_TOLERANCE}): it serves "
                "another model under the same name; every server in teacher.urls must serve "
                "the same weights"
            )

    async def _check_tokenize(self, tokenizer) -> None:
        """Each vLLM replica's `/tokenize` of a probe text must give `tokenizer`'s ids; a
        server without it (or no tokenizer to check against) is used unchecked, with a
        warning."""
        probe = {"model": self.model, "prompt": TOKENIZE_PROBE, "add_special_tokens": False}
        body = json.dumps(probe).encode()
        want = None if tokenizer is None else tokenizer(TOKENIZE_PROBE, add_special_tokens=False)
        for replica in self.pool.replicas:
            got = None
            if want is not None:
                got = await self.pool.request(replica, "POST", "/tokenize", body, ok404=True)
            if got is None:
                log.warning(
                    "teacher %s has neither /opd/v1/info nor /tokenize: its tokenizer cannot be "
                    "checked; make sure it is the one this run expects",
                    replica.url,
                )
                continue
            tokens = got.get("tokens") if isinstance(got, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise TeacherRequestError(f"{replica.url}/tokenize answered without a token list")
            if tokens != want.input_ids:
                name = getattr(tokenizer, "name_or_path", "?")
                raise ValueError(
                    f"teacher {self.model!r} at {replica.url} tokenizes a probe text as "
                    f"{tokens[:12]} but tokenizer {name!r} as {want.input_ids[:12]}: the server "
                    "runs another tokenizer (set cross_tokenizer.teacher_tokenizer to the server's)"
                )

    def _check(self, fingerprint, vocab_size, topk) -> None:
        if self.protocol == "vllm":
            return  # its tokenizer is checked by /tokenize (`_check_tokenize`)
        info = self.info
        if fingerprint and info["tokenizer_fingerprint"] != fingerprint:
            raise ValueError(
                f"teacher {info['model']!r} at {self.url} uses a different tokenizer than the "
                f"student (fingerprint {info['tokenizer_fingerprint']}, {info['vocab_size']} "
                f"tokens vs {fingerprint}, {vocab_size} tokens); to distill across tokenizers "
                "set cross_tokenizer.teacher_tokenizer to the server's tokenizer"
            )
        if vocab_size is not None and info["vocab_size"] != vocab_size:
            raise ValueError(
                f"teacher at {self.url} has {info['vocab_size']} tokens, the student {vocab_size}"
            )
        if topk > info["limits"]["max_topk"]:
            raise ValueError(
                f"top-k {topk} (loss.topk; for pg across tokenizers cross_tokenizer.boundary_topk) "
                f"but teacher server {self.url} allows at most {info['limits']['max_topk']} (its --max-topk)"
            )

    @property
    def failovers(self) -> int:
        """Requests moved to another replica after one failed (cumulative)."""
        return self.pool.failovers

    def step_record(self, sum_all=None) -> dict:
        """Per-step metrics: failovers since the last call (summed over ranks by `sum_all`,
        a multi-process run's), replicas in rotation now (this process's view)."""
        total = self.pool.failovers
        since, self._failovers_logged = total - self._failovers_logged, total
        return {
            "teacher_failovers": sum_all([since])[0] if sum_all is not None else since,
            "teacher_replicas_healthy": len(self.pool.healthy),
        }

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            self._call(self.pool.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        # Each micro-batch is shared by the replicas in rotation, about equal positions each.
        every = self.protocol == "vllm"  # vLLM scores every position, not only from start
        chunks = [
            chunk
            for part in spread(rows, len(self.pool.healthy))
            for chunk in request_chunks(part, k, self.max_seqs, self.max_logprobs, every)
        ]
        parts = await asyncio.gather(
            *(
                self.pool.run(functools.partial(self._score_chunk, rows=c, k=k), positions(c))
                for c in chunks
            )
        )
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

    async def _score_chunk(self, replica: Replica, rows, k: int) -> list[tuple]:
        """Checked `(token_logprobs, topk_ids, topk_logprobs)` per row of one request."""
        seqs, starts = [r[1] for r in rows], [r[2] for r in rows]
        url, vocab = replica.url, self.vocab_size
        if self.pool.protocol == "opd":  # self.protocol is set once the pool has connected
            want = [len(s) - st for s, st in zip(seqs, starts)]
            return await self._post(
                replica,
                "/opd/v1/score",
                {"sequences": seqs, "start": starts, "topk": k},
                lambda body: unpack_opd_score(url, body, want, k, vocab),
                answer_bytes_bound(sum(want), len(seqs), k, "opd"),
            )
        payload = {
            "model": self.pool.identity["model"],
            "prompt": seqs,
            "max_tokens": 0,
            "echo": True,
            "prompt_logprobs": k,
            "return_token_ids": True,  # lets vLLM skip detokenizing the echoed prompt
        }
        scored = sum(len(s) for s in seqs)  # every position is scored, and echoed
        return await self._post(
            replica,
            "/v1/completions",
            payload,
            lambda body: unpack_completions(url, body, seqs, starts, k, vocab),
            answer_bytes_bound(scored, len(seqs), k, "vllm"),
        )

    async def _post(self, replica: Replica, path: str, payload: dict, parse, max_bytes: int):
        body = json.dumps(payload, separators=(",", ":")).encode()
        return await self.pool.request(
            replica, "POST", path, body, parse=parse, max_bytes=max_bytes
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


def remote_teacher_from_config(config, tokenizer, min_topk: int = 0) -> RemoteTeacher:
    """`teacher.kind: remote` of a run config, checked against `tokenizer`, top-k >= `min_topk`."""
    from opd.modeling.hf import tokenizer_fingerprint

    check_remote_config(config)
    t = config.teacher
    return RemoteTeacher(
        t.servers,
        token=os.environ.get(t.api_key_env) or None,
        timeout_s=t.timeout_s,
        max_retries=t.max_retries,
        token_env=t.api_key_env,
        expected_fingerprint=tokenizer_fingerprint(tokenizer),
        expected_vocab_size=len(tokenizer),
        required_topk=max(teacher_need(config.loss)[1], min_topk),
        tokenizer=tokenizer,
    )
