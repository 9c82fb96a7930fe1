"""One teacher served by several servers: least-loaded routing, failover, health checks.

    teacher.kind=remote teacher.urls=[http://gpu-a:8000,http://gpu-b:8000]

Every replica must serve the same model: at connect each one's identity (protocol, model
name, tokenizer fingerprint, vocabulary size and the log-prob limits: `max_topk`,
`max_logprobs_per_request`, `max_seq_len`) is compared with the first reachable one's and a
mismatch is refused naming the replica. A replica that does not answer at connect starts
out of rotation (a warning), and its identity is checked when it first comes back.

A request goes to the healthy replica with the fewest positions in flight (ties: the one
that has served fewest requests, then the first listed), as verl's teacher balancer picks
the least in-flight server. A replica that fails a request (transport error, timeout, HTTP
408/429/5xx, an answer `opd.teachers.answer_checks` refuses) is taken out of rotation and the request is
retried at once on another healthy replica: a failover, counted. A replica out of rotation
is probed (`/opd/v1/info`, or `/v1/models` for vLLM) every `probe_interval_s` while others
serve, and comes back when it answers with the same identity. Only when no replica is
healthy does a request wait: `backoff_s * 2**n` (capped, with jitter), then every replica is
probed; after `max_retries` such rounds `TeacherUnavailable` names all replicas and the run
stops with its last checkpoint intact (exit 3). With one replica this is the single
server's retry schedule.

The pool runs on the caller's asyncio loop (`opd.teachers.remote` owns one in a thread);
nothing here blocks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from opd.teachers.answer_checks import check_info, check_models
from opd.teachers.bounded_http import INFO_BYTES, error_message, fetch, parse_json
from opd.teachers.errors import BadAnswer, TeacherRequestError, TeacherUnavailable

log = logging.getLogger("opd")

RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# What must agree between replicas of one teacher (opd servers; vLLM reports a model only).
IDENTITY = ("protocol", "model", "tokenizer_fingerprint", "vocab_size")
LIMIT_KEYS = ("max_topk", "max_logprobs_per_request", "max_seq_len")


class ReplicaFailed(Exception):
    """One attempt on one replica failed in a way another replica (or a later try) may not."""


@dataclass
class Replica:
    url: str
    client: httpx.AsyncClient
    info: dict | None = None  # what it said at connect (None: not reached yet)
    healthy: bool = False
    inflight: int = 0  # positions of the requests it is answering now
    served: int = 0  # requests it answered
    failures: int = 0  # requests that failed on it (each one failed over or waited)
    last_error: str = ""
    next_probe: float = 0.0
    probing: asyncio.Task | None = field(default=None, repr=False)


def identity(protocol: str, info: dict) -> dict:
    """The fields every replica of one teacher must share."""
    if protocol == "vllm":
        return {"protocol": "vllm", "model": info["model"]}
    limits = info.get("limits", {})
    return {
        "protocol": "opd",
        **{k: info.get(k) for k in IDENTITY[1:]},
        **{k: limits.get(k) for k in LIMIT_KEYS},
    }


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class ReplicaPool:
    """The replicas of one teacher; `run(attempt, weight)` sends one request through them."""

    def __init__(
        self,
        urls: list[str],
        make_client: Callable[[str], httpx.AsyncClient],
        headers: dict,
        *,
        token_env: str = "OPD_TEACHER_TOKEN",
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        probe_interval_s: float = 5.0,
    ):
        if not urls:
            raise ValueError("a remote teacher needs at least one URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"teacher.urls lists a server twice: {urls}")
        self.replicas = [Replica(u, make_client(u)) for u in urls]
        self.headers, self.token_env, self.timeout_s = headers, token_env, timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.probe_interval_s = probe_interval_s
        self.protocol = ""
        self.identity: dict = {}
        self.failovers = 0  # requests moved to another replica after a failure
        # `await verify(replica)` raises ValueError for a replica that answers as another
        # model would (set by the client: it knows how to score)
        self.verify: Callable[[Replica], Awaitable[None]] | None = None
        self._probe_lock = asyncio.Lock()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    @property
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    # -- one HTTP attempt -----------------------------------------------------------------

    async def request(
        self,
        replica: Replica,
        method: str,
        path: str,
        body: bytes | None = None,
        ok404: bool = False,
        *,
        parse=None,
        max_bytes: int = INFO_BYTES,
    ):
        """One attempt: the answer (read within `max_bytes` and `timeout_s`, decoded, passed
        through `parse`, which raises `BadAnswer`), None for a 404 when `ok404`;
        `ReplicaFailed` when another try may succeed, `TeacherRequestError` when none would."""
        try:
            status, raw = await fetch(
                replica.client,
                method,
                path,
                server=replica.url,
                content=body,
                headers=self.headers,
                max_bytes=max_bytes,
                deadline_s=self.timeout_s,
            )
            if status == 200:
                data = parse_json(replica.url, path, raw)
                return parse(data) if parse is not None else data
        except httpx.TransportError as err:  # refused, reset, timed out, ...
            raise ReplicaFailed(describe(err)) from None
        except BadAnswer as err:  # none of it is used; another replica or try may be sound
            raise ReplicaFailed(f"unusable answer: {err.problem}") from None
        if status == 404 and ok404:
            return None
        message = error_message(raw)
        if status in (401, 403):
            raise TeacherRequestError(
                f"teacher server {replica.url} refused the bearer token (HTTP {status}: "
                f"{message}); set the environment variable {self.token_env} to the server's token"
            )
        if status not in RETRY_STATUS:
            raise TeacherRequestError(
                f"teacher server {replica.url}{path} answered HTTP {status}: {message}"
            )
        raise ReplicaFailed(f"HTTP {status}: {message}")

    async def _fetch_info(self, replica: Replica, protocol: str) -> tuple[str, dict]:
        """`(protocol, info)` of one replica, one attempt each endpoint, checked."""
        url = replica.url
        if protocol != "vllm":
            parse = lambda body: check_info(url, body)  # noqa: E731
            info = await self.request(replica, "GET", "/opd/v1/info", ok404=True, parse=parse)
            if info is not None:
                return "opd", info
            if protocol == "opd":
                raise TeacherRequestError(f"{url} has no /opd/v1/info: it is not an opd server")
        parse = lambda body: check_models(url, body)  # noqa: E731
        return "vllm", {"model": await self.request(replica, "GET", "/v1/models", parse=parse)}

    # -- connect ----------------------------------------------------------------------------

    async def _reach(self, protocol: str) -> dict:
        """Each replica's `(protocol, info)` or its `ReplicaFailed`. All are asked at once;
        another round (after the backoff) only while none has answered, at most
        `max_retries` more: one live replica is enough to start, the rest join later."""
        start, results, last = time.monotonic(), {}, ""
        for attempt in range(self.max_retries + 1):
            todo = [r for r in self.replicas if not isinstance(results.get(r.url), tuple)]
            outcomes = await asyncio.gather(
                *(self._fetch_info(r, protocol) for r in todo), return_exceptions=True
            )
            for replica, outcome in zip(todo, outcomes):
                if isinstance(outcome, BaseException) and not isinstance(outcome, ReplicaFailed):
                    raise outcome  # a wrong token or a non-opd server: the user must fix it
                results[replica.url] = outcome
                last = str(outcome) if isinstance(outcome, ReplicaFailed) else last
            if any(isinstance(v, tuple) for v in results.values()):
                return results
            if attempt < self.max_retries:
                await asyncio.sleep(self._delay(attempt))
        tries, seconds = self.max_retries + 1, time.monotonic() - start
        raise TeacherUnavailable(", ".join(self.urls), tries, seconds, last)

    async def connect(self, protocol: str) -> dict:
        """Reach the replicas, check they serve one model; the first reachable one's info."""
        results = await self._reach(protocol)
        reached = [(r, results[r.url]) for r in self.replicas if isinstance(results[r.url], tuple)]
        first, (self.protocol, info) = reached[0][0], reached[0][1]
        self.identity = identity(self.protocol, info)
        for replica, (proto, their) in reached:
            self._check_same(replica, identity(proto, their), first.url)
            replica.info = their
        for replica in self.replicas:
            try:
                if isinstance(results[replica.url], ReplicaFailed):
                    raise results[replica.url]
                if self.verify is not None:
                    await self.verify(replica)
                replica.healthy = True
            except ReplicaFailed as err:
                replica.last_error = str(err)
                replica.next_probe = time.monotonic() + self.probe_interval_s
                log.warning(
                    "teacher replica %s did not answer at connect (%s); it joins when a health "
                    "check reaches it",
                    replica.url,
                    err,
                )
        if not self.healthy:
            raise TeacherUnavailable(", ".join(self.urls), 1, 0.0, self.replicas[0].last_error)
        return info

    def _check_same(self, replica: Replica, theirs: dict, reference: str) -> None:
        for key, want in self.identity.items():
            if theirs.get(key) != want:
                raise ValueError(
                    f"teacher replica {replica.url} serves {key}={theirs.get(key)!r} but "
                    f"{reference} serves {key}={want!r}: every server in teacher.urls must "
                    "serve the same model with the same tokenizer and log-prob limits"
                )

    # -- health ---------------------------------------------------------------------------

    async def _probe(self, replica: Replica) -> None:
        """Bring `replica` back when it answers with the pool's identity."""
        try:
            proto, info = await self._fetch_info(replica, self.protocol)
            self._check_same(replica, identity(proto, info), "the other replicas")
            if self.verify is not None:
                await self.verify(replica)
        except (ReplicaFailed, TeacherRequestError, ValueError) as err:
            replica.last_error = str(err)
            replica.next_probe = time.monotonic() + self.probe_interval_s
            if not isinstance(err, ReplicaFailed):  # it answers, but is not this teacher
                log.error("teacher replica %s stays out of rotation: %s", replica.url, err)
            return
        replica.info, replica.healthy = info, True
        log.info("teacher replica %s is back in rotation", replica.url)

    def _probe_due(self) -> None:
        """Start background probes of replicas out of rotation whose time has come."""
        now = time.monotonic()
        for r in self.replicas:
            if not r.healthy and now >= r.next_probe and (r.probing is None or r.probing.done()):
                r.probing = asyncio.ensure_future(self._probe(r))

    async def _probe_all(self) -> None:
        async with self._probe_lock:
            if not self.healthy:
                await asyncio.gather(*(self._probe(r) for r in self.replicas if not r.healthy))

    def _delay(self, attempt: int) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return delay * (1 + 0.25 * random.random())

    # -- routing ----------------------------------------------------------------------------

    def _pick(self, tried: set[int]) -> Replica | None:
        self._probe_due()
        live = [r for i, r in enumerate(self.replicas) if r.healthy and i not in tried]
        return min(live, key=lambda r: (r.inflight, r.served), default=None)

    async def run(self, attempt: Callable[[Replica], Awaitable], weight: int = 1):
        """`await attempt(replica)` on the least-loaded healthy replica; on `ReplicaFailed`
        the replica leaves rotation and the request moves to another one."""
        start, tried, rounds, last = time.monotonic(), set(), 0, ""
        while True:
            replica = self._pick(tried)
            if replica is None:
                if rounds >= self.max_retries:
                    raise TeacherUnavailable(
                        ", ".join(self.urls), rounds + 1, time.monotonic() - start, last
                    )
                await asyncio.sleep(self._delay(rounds))
                rounds += 1
                await self._probe_all()
                tried.clear()
                continue
            replica.inflight += weight
            try:
                result = await attempt(replica)
            except ReplicaFailed as err:
                last, tries = f"{replica.url}: {err}", self.max_retries + 1
                log.warning("teacher server %s (attempt %d of %d)", last, rounds + 1, tries)
                self._fail(replica, str(err))
                tried.add(self.replicas.index(replica))
                if self._pick(tried) is not None:
                    self.failovers += 1
                continue
            finally:
                replica.inflight -= weight
            replica.served += 1
            return result

    def _fail(self, replica: Replica, error: str) -> None:
        replica.failures += 1
        replica.last_error = error
        if replica.healthy:
            replica.healthy = False
            replica.next_probe = time.monotonic() + self.probe_interval_s
            if len(self.replicas) > 1:
                log.warning(
                    "teacher replica %s failed (%s); out of rotation until a health check "
                    "brings it back",
                    replica.url,
                    error,
                )

    async def aclose(self) -> None:
        for r in self.replicas:
            if r.probing is not None and not r.probing.done():
                r.probing.cancel()
        await asyncio.gather(*(r.client.aclose() for r in self.replicas))


# -- what the client sends through the pool ------------------------------------------------


def positions(rows) -> int:
    """Scored positions of `(row, sequence, start)` tuples: a request's load."""
    return sum(len(seq) - start for _, seq, start in rows)


def spread(rows: list, parts: int) -> list[list]:
    """`rows` as at most `parts` consecutive groups of about equal scored positions."""
    total, groups, current, done = positions(rows), [], [], 0
    for row in rows:
        current.append(row)
        done += len(row[1]) - row[2]
        if len(groups) < parts - 1 and done >= total * (len(groups) + 1) / parts:
            groups.append(current)
            current = []
    return [g for g in (*groups, current) if g]
