"""HTTP to an OpenAI-compatible server for `opd generate --endpoint`: bounded concurrency,
a rate limit, retries that honour `Retry-After`, a deadline per request, bounded answers.

Why these rules. A hosted API answers 429 with `Retry-After` when a client goes faster than
its quota, and 5xx or a dropped connection when it is busy; both pass, so they are retried
(after `Retry-After` when the server says, else exponential backoff with jitter) within a
deadline per request. Any other 4xx is the request's own fault (a prompt too long, a
parameter the server refuses): retrying cannot help, so it is returned as a row error.
401/403 is the key's fault for every row: it stops the run, naming the environment
variable. The key is read from the environment, sent as a bearer token and kept nowhere
else: not in the cache, not in a log line, not in an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from dataclasses import dataclass

import httpx

from opd.teachers.bounded_http import ERROR_BODY_BYTES, error_message, parse_json
from opd.teachers.errors import BadAnswer, TeacherUnavailable

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class EndpointSettings:
    """How opd talks to the server; none of it changes what the cache holds.

    Attributes:
        api_key_env: environment variable holding the API key, sent as a bearer token and
            never written anywhere; unset or empty: no key is sent.
        concurrency: requests in flight at most.
        requests_per_minute: request rate limit (0: none).
        tokens_per_minute: prompt + completion token rate limit (0: none); a request is
            charged its prompt estimate plus `max_tokens * n` before it is sent and
            corrected by the server's reported usage after.
        timeout_s: limit of one attempt (connect, send, read).
        deadline_s: limit of one request over all its attempts and waits.
        max_retries: retries of a request after 408/429/5xx, a timeout or a dropped
            connection.
        backoff_s: first wait between attempts when the server gives no `Retry-After`;
            doubled per attempt up to `max_backoff_s`.
        max_backoff_s: longest wait between attempts (a longer `Retry-After` is honoured
            while the deadline allows).
        max_response_mb: a larger answer is refused (row error), so a runaway server
            cannot fill memory; a generation request's bound is also derived from what it
            asks for (n x max_tokens x (top-k + 2) entries, with headroom).
    """

    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    requests_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    timeout_s: float = 120.0
    deadline_s: float = 600.0
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_response_mb: float = 64.0

    def __post_init__(self):
        checks = {
            "concurrency": self.concurrency >= 1,
            "requests_per_minute": self.requests_per_minute >= 0,
            "tokens_per_minute": self.tokens_per_minute >= 0,
            "timeout_s": self.timeout_s > 0,
            "deadline_s": self.deadline_s > 0,
            "max_retries": self.max_retries >= 0,
            "backoff_s": self.backoff_s >= 0,
            "max_backoff_s": self.max_backoff_s >= 0,
            "max_response_mb": self.max_response_mb > 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is not allowed")


class EndpointUnavailable(TeacherUnavailable):
    """The server did not answer a request within its retries and deadline: the run stops;
    the shards written so far stay, and the same command resumes."""

    def __init__(self, url: str, attempts: int, seconds: float, last_error: str):
        RuntimeError.__init__(
            self,
            f"endpoint {url} is unavailable: {attempts} attempt(s) over {seconds:.1f} s "
            f"failed (last error: {last_error}). The finished shards are kept; rerun the "
            "same command to resume.",
        )
        self.url, self.attempts, self.seconds, self.last_error = url, attempts, seconds, last_error


class RequestRefused(Exception):
    """The server refused one request (a 4xx other than auth): a row error, not fatal."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RateLimiter:
    """Two token buckets (requests, tokens per minute), each holding one second's worth.

    A request waits until both hold enough; a request costing more tokens than a bucket
    holds waits for a full bucket and leaves it in debt, so it is slowed, never stuck."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float, clock=time.monotonic):
        self.clock = clock
        self.rates = [requests_per_minute / 60.0, tokens_per_minute / 60.0]
        self.levels = [max(r, 1.0) for r in self.rates]
        self.last = clock()
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        for i, rate in enumerate(self.rates):
            if rate:
                self.levels[i] = min(max(rate, 1.0), self.levels[i] + rate * (now - self.last))
        self.last = now

    async def acquire(self, tokens: float) -> None:
        async with self.lock:  # first come, first served
            costs = [1.0, float(tokens)]
            while True:
                self._refill()
                waits = [
                    0.0
                    if not rate or self.levels[i] >= min(costs[i], max(rate, 1.0))
                    else (min(costs[i], max(rate, 1.0)) - self.levels[i]) / rate
                    for i, rate in enumerate(self.rates)
                ]
                if max(waits) <= 0:
                    for i, rate in enumerate(self.rates):
                        if rate:
                            self.levels[i] -= costs[i]
                    return
                await asyncio.sleep(max(waits))

    def correct(self, tokens: float) -> None:
        """Charge (or refund) the difference between the estimate and the reported usage."""
        if self.rates[1]:
            self._refill()
            self.levels[1] = min(max(self.rates[1], 1.0), self.levels[1] - tokens)


def retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class EndpointClient:
    """One async client per run, over one server or several replicas of it; `post` returns
    `(json body, attempts)`.

    With several servers (`opd generate --endpoint A --endpoint B`) each attempt goes to
    the server with the fewest requests in flight among those in rotation. A server whose
    attempt fails in a way another may not (a dropped connection, a timeout, 408/429/5xx)
    leaves rotation for `backoff_s * 2**n` (its own failures in a row; at least a
    `Retry-After` it sent), and the request moves at once to another server in rotation (a
    failover, counted); only when none is left does it wait, as with one server. Every
    attempt counts toward `max_retries` and the request's deadline. Seeds travel with the
    requests, so which server answers does not change a seeded cache."""

    def __init__(self, url: str | list[str], settings: EndpointSettings):
        self.urls = [u.rstrip("/") for u in ([url] if isinstance(url, str) else url)]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"--endpoint names a server twice: {self.urls}")
        self.url, self.settings = ", ".join(self.urls), settings  # `url`: what messages name
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute)
        self.slots = asyncio.Semaphore(settings.concurrency)  # in flight over all servers
        self.clients = {
            u: httpx.AsyncClient(
                base_url=u,
                timeout=httpx.Timeout(settings.timeout_s, connect=min(settings.timeout_s, 10.0)),
                limits=httpx.Limits(max_connections=settings.concurrency + 2),
                trust_env=False,  # the endpoint is reached as given, never through env proxies
            )
            for u in self.urls
        }
        self.inflight = dict.fromkeys(self.urls, 0)
        self.out_until = dict.fromkeys(self.urls, 0.0)  # out of rotation until (monotonic)
        self.strikes = dict.fromkeys(self.urls, 0)  # failures in a row
        self.failovers = 0  # attempts moved to another server after one failed

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients.values()))

    def drop(self, url: str) -> None:
        """Leave `url` out of this run (it did not answer at connect: unchecked)."""
        self.urls.remove(url)

    def _pick(self) -> str:
        """The server in rotation with the fewest requests in flight (ties: listed first);
        with none in rotation, the one that comes back soonest."""
        now = time.monotonic()
        live = [u for u in self.urls if self.out_until[u] <= now]
        if live:
            return min(live, key=lambda u: self.inflight[u])
        return min(self.urls, key=lambda u: self.out_until[u])

    def _failed(self, url: str, wait: float) -> bool:
        """`url` failed an attempt: out of rotation for `wait`; True when another server
        is in rotation now (the next attempt goes there at once)."""
        if len(self.urls) == 1:
            return False
        self.strikes[url] += 1
        self.out_until[url] = time.monotonic() + wait
        now = time.monotonic()
        return any(self.out_until[u] <= now for u in self.urls)

    async def _send(self, url: str, method: str, path: str, body, timeout: float, limit: int):
        """(status, headers, body bytes) of one attempt; the body read up to `limit` bytes."""
        client = self.clients[url]
        req = client.build_request(
            method, path, content=body, headers=self._headers, timeout=timeout
        )
        resp = await client.send(req, stream=True)
        ok = resp.status_code == 200
        limit = limit if ok else ERROR_BODY_BYTES  # of an error, only its message is wanted
        try:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit and ok:
                    raise RequestRefused(200, f"answer larger than {limit:,} bytes, its bound")
                chunks.append(chunk)
                if size > limit:
                    break
        finally:
            await resp.aclose()
        return resp.status_code, resp.headers, b"".join(chunks)[:limit]

    async def request(
        self,
        method: str,
        path: str,
        payload: dict | None = None,
        tokens: float = 0.0,
        max_bytes: int | None = None,
        server: str | None = None,
    ) -> tuple[dict | None, int]:
        """The JSON answer and the attempts it took; None for a 404 on a GET (a probe).

        `max_bytes` bounds the answer (within `max_response_mb`). An attempt ends after
        `timeout_s` in all, so a body that trickles in cannot outlive it. `server`: that
        one server only (the checks at connect), never failed over."""
        s = self.settings
        limit = int(s.max_response_mb * (1 << 20))
        limit = min(limit, max_bytes) if max_bytes else limit
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        start, last = time.monotonic(), ""
        deadline = start + s.deadline_s
        for attempt in range(s.max_retries + 1):
            await self.limiter.acquire(tokens if attempt == 0 else 0.0)
            wait = min(s.max_backoff_s, s.backoff_s * 2**attempt) * (1 + 0.25 * random.random())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            async with self.slots:
                url = server or self._pick()
                limit_s = min(s.timeout_s, remaining)
                self.inflight[url] += 1
                try:
                    status, headers, raw = await asyncio.wait_for(
                        self._send(url, method, path, body, limit_s, limit), limit_s
                    )
                except httpx.TransportError as err:  # refused, reset, timed out, ...
                    last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                    status = None
                except asyncio.TimeoutError:
                    last, status = f"no complete answer within {limit_s:.1f} s", None
                finally:
                    self.inflight[url] -= 1
            if status == 200:
                self.strikes[url] = 0
                try:
                    return parse_json(url, path, raw), attempt + 1
                except BadAnswer as err:  # a proxy's HTML page, a cut body: named, with a snippet
                    raise RequestRefused(200, err.problem) from None
            if status is not None:
                message = error_message(raw)
                if status == 404 and method == "GET":
                    return None, attempt + 1
                if status in (401, 403):
                    raise ValueError(
                        f"endpoint {url} refused the API key (HTTP {status}: {message}); "
                        f"set the environment variable {s.api_key_env} to a valid key"
                    )
                if status not in RETRY_STATUS:
                    raise RequestRefused(status, message)
                last = f"HTTP {status}: {message}"
                hint = retry_after_s(headers.get("retry-after"))
                if hint is not None:
                    wait = hint
            last = f"{url}: {last}" if len(self.urls) > 1 else last
            if attempt == s.max_retries:
                break
            if server is None:
                pause = min(s.max_backoff_s, s.backoff_s * 2 ** self.strikes[url])
                if self._failed(url, max(pause, wait)):
                    self.failovers += 1
                    continue  # another server is in rotation: no wait
            if time.monotonic() + wait > deadline:
                break
            await asyncio.sleep(wait)
        raise EndpointUnavailable(
            self.url, attempt + 1, time.monotonic() - start, last or "deadline passed"
        )
