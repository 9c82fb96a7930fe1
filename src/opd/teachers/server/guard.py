"""Connection guard of the teacher server: a deadline for request headers, a cap per client.

uvicorn closes idle keep-alive connections, but never one that has sent part of its request
headers and stalled. Such connections count against `limit_concurrency`, so a few hundred
of them, opened before any authentication can happen, made every real request answer 503
(slowloris). Here every connection must deliver complete request headers within
`header_timeout_s` of connecting (and of its previous response, for keep-alive), and one
client address holds at most `max_client_connections` connections: at the cap, a new
connection replaces that client's oldest one still waiting for headers, or is closed when
all of them are busy with requests. A client that sends requests never waits for headers
longer than it takes them to arrive, so it is not the one replaced.

The guard wraps whichever HTTP protocol class uvicorn uses (h11 or httptools): both create
their request cycle (`self.cycle = ...`) exactly when the headers are complete, and call
`on_response_complete` when a response is done, which is all it hooks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("opd.teachers.server")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # seconds for a connection to send its request headers
    max_client_connections: int = 64  # open connections per client address

    def __post_init__(self):
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s={self.header_timeout_s} must be > 0")
        if self.max_client_connections < 1:
            raise ValueError(f"max_client_connections={self.max_client_connections} must be >= 1")


class _Registry:
    """Open connections per client address, oldest first (one per server; event-loop only)."""

    def __init__(self):
        self.by_client: dict[str, dict] = {}
        self.timed_out = 0  # connections closed for not sending headers in time
        self.replaced = 0  # waiting connections closed to admit a newer one of the same client
        self.refused = 0  # new connections closed because the client's were all busy


def guarded_protocol(base: type, limits: ConnectionLimits) -> type:
    """A subclass of uvicorn's HTTP protocol class `base` that enforces `limits`."""
    registry = _Registry()

    class Guarded(base):
        _header_timer = None
        _cycle = None
        _host = ""

        @property
        def cycle(self):
            return self._cycle

        @cycle.setter
        def cycle(self, value):  # set by uvicorn when a request's headers are complete
            self._cycle = value
            if value is not None:
                self._disarm()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._host = self.client[0] if self.client else ""
            mine = registry.by_client.setdefault(self._host, {})
            if len(mine) >= limits.max_client_connections:
                waiting = next((c for c in mine if c._header_timer is not None), None)
                if waiting is None:
                    registry.refused += 1
                    transport.close()
                    return
                registry.replaced += 1
                waiting._drop()
            mine[self] = None
            self._arm()

        def connection_lost(self, exc) -> None:
            self._forget()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers are due; a pipelined one disarms at once
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _timed_out(self) -> None:
            self._header_timer = None
            registry.timed_out += 1
            log.debug("closing a connection from %s: no request headers in time", self._host)
            self._drop()

        def _drop(self) -> None:
            self._forget()
            self.transport.close()

        def _forget(self) -> None:
            self._disarm()
            mine = registry.by_client.get(self._host)
            if mine is not None:
                mine.pop(self, None)
                if not mine:
                    del registry.by_client[self._host]

    Guarded.registry = registry
    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
