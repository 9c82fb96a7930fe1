"""Reading a teacher server's answer with a byte bound and one deadline for the whole request.

httpx's timeout bounds each read, not the request: a body that trickles a byte every few
seconds, or streams without end, would hold a request (and grow memory) for as long as the
server likes. Here every answer is streamed with a byte counter under one wall-clock
deadline:

    status, raw = await fetch(client, "POST", path, server=url, content=body,
                              headers=headers, max_bytes=bound, deadline_s=timeout_s)
    data = parse_json(url, path, raw)  # BadAnswer naming the server, with a snippet

A 200 body over `max_bytes` (declared or counted) or a request past `deadline_s` raises
`BadAnswer` (retryable) as soon as it is known, and the rest is never read. Error bodies
(non-200) are cut at `ERROR_BODY_BYTES`: only their message is wanted. `get_sync` does the
same for one GET outside an event loop (preflight); its deadline is checked per chunk, so a
server that stops sending is caught by httpx's read timeout, also `deadline_s`.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from opd.teachers.errors import BadAnswer

ERROR_BODY_BYTES = 1 << 16
INFO_BYTES = 1 << 20  # /opd/v1/info, /v1/models: a few hundred bytes in practice
_SNIPPET = 120


def snippet(raw: bytes) -> str:
    """The start of a body, one line, for a message."""
    text = raw[: _SNIPPET * 4].decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return repr(text[:_SNIPPET] + ("..." if len(text) > _SNIPPET or len(raw) > 4 * _SNIPPET else ""))


def _declared(resp: httpx.Response) -> int | None:
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _too_large(server: str, path: str, size: int, limit: int, declared: bool) -> BadAnswer:
    said = "declares" if declared else "ran past"
    return BadAnswer(
        server,
        f"the answer to {path} {said} {size} bytes, more than the {limit} an answer to this "
        "request can take; the rest was not read",
    )


def _late(server: str, path: str, deadline_s: float, got: int) -> BadAnswer:
    return BadAnswer(
        server,
        f"no complete answer to {path} within {deadline_s:g} s (teacher.timeout_s; {got} "
        "bytes received)",
    )


async def fetch(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    server: str,
    max_bytes: int,
    deadline_s: float,
    content: bytes | None = None,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    """`(status, body)` of one request, within `max_bytes` (200 bodies) and `deadline_s`."""
    got = [0]  # bytes received, for the message of a late answer

    async def read() -> tuple[int, bytes]:
        async with client.stream(method, path, content=content, headers=headers) as resp:
            ok = resp.status_code == 200
            limit = max_bytes if ok else ERROR_BODY_BYTES
            size = _declared(resp)
            if ok and size is not None and size > limit:
                raise _too_large(server, path, size, limit, True)
            buf = bytearray()
            async for chunk in resp.aiter_bytes():
                buf += chunk
                got[0] = len(buf)
                if len(buf) > limit:
                    if ok:
                        raise _too_large(server, path, len(buf), limit, False)
                    del buf[limit:]
                    break
            return resp.status_code, bytes(buf)

    try:
        return await asyncio.wait_for(read(), deadline_s)
    except asyncio.TimeoutError:  # the whole request, however slowly its body trickles
        raise _late(server, path, deadline_s, got[0]) from None


def get_sync(
    url: str, *, server: str, headers: dict, max_bytes: int, deadline_s: float
) -> tuple[int, bytes]:
    """`(status, body)` of one GET outside an event loop, bounded like `fetch`."""
    start, path = time.monotonic(), httpx.URL(url).path
    with httpx.stream("GET", url, headers=headers, timeout=deadline_s, trust_env=False) as resp:
        ok = resp.status_code == 200
        limit = max_bytes if ok else ERROR_BODY_BYTES
        size = _declared(resp)
        if ok and size is not None and size > limit:
            raise _too_large(server, path, size, limit, True)
        buf = bytearray()
        for chunk in resp.iter_bytes():
            buf += chunk
            if time.monotonic() - start > deadline_s:
                raise _late(server, path, deadline_s, len(buf))
            if len(buf) > limit:
                if ok:
                    raise _too_large(server, path, len(buf), limit, False)
                del buf[limit:]
                break
        return resp.status_code, bytes(buf)


def parse_json(server: str, path: str, raw: bytes):
    """The JSON of a 200 body; anything else (an HTML page from a proxy, a cut body) is a
    `BadAnswer` naming the server, what the parser said and the body's start."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        problem = "is not UTF-8"
    except json.JSONDecodeError as err:
        problem = f"is not JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except RecursionError:
        problem = "is JSON nested too deeply to read"
    raise BadAnswer(server, f"the HTTP 200 answer to {path} {problem}: {snippet(raw)}")


def error_message(raw: bytes) -> str:
    """The message of an error body in vLLM's / OpenAI's layout, else its start."""
    try:
        body = json.loads(raw)
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    except (ValueError, RecursionError):
        return snippet(raw)
