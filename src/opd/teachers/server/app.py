"""`opd serve`: a teacher server that scores token sequences for remote distillation.

    OPD_TEACHER_TOKEN=secret opd serve --model Qwen/Qwen3-8B --host 0.0.0.0 --port 8000
    opd train cfg.yaml teacher.kind=remote teacher.url=http://gpu-host:8000

It hosts one Hugging Face causal LM, loaded from `--model` at start (a request never makes
it load anything), and answers:

* `GET /health`: `{"status": "ok"}`, no token needed (for load balancers);
* `GET /opd/v1/info`: model name, `vocab_size`, `tokenizer_fingerprint`
  (`opd.modeling.hf.tokenizer_fingerprint`) and the request limits, so clients can refuse a
  teacher whose token ids mean something else;
* `GET /v1/models`, `POST /v1/completions`: the vLLM-compatible scoring subset, and
  `POST /opd/v1/score`: the compact form (both specified in `opd.teachers.server.protocol`).

Concurrent requests are batched into padded forwards (`opd.teachers.server.batcher`). Secure by
default: it binds 127.0.0.1; a bearer token (read from the environment variable named by
`--token-env`) is required on every endpoint but `/health` whenever one is set, and the
server refuses to bind a non-loopback address without one. It speaks plain HTTP: the token
and the data cross the network in clear, so off loopback put TLS in front (a reverse proxy
or an SSH tunnel). Oversized requests get 413 (including answers that would hold more than
`max_logprobs_per_request` log-probs), invalid ones 400, a body that does not arrive within
`body_timeout_s` gets 408; a connection whose request headers do not arrive within
`header_timeout_s` is closed, and one client address holds at most `max_client_connections`
connections (`opd.teachers.server.guard`). On SIGINT /
SIGTERM uvicorn stops accepting connections, finishes the requests in flight, and only then
is the batcher stopped.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from opd.teachers.server.batcher import Batcher
from opd.teachers.server.guard import ConnectionLimits, guarded_protocol
from opd.teachers.server.protocol import (
    Limits,
    RequestError,
    completion_chunks,
    parse_completion,
    parse_score,
    score_response,
)

log = logging.getLogger("opd.teachers.server")


@dataclass
class ServeSettings:
    model: str  # local directory (or hub id) of the teacher
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token; required when `host` is not loopback
    served_model_name: str = ""  # the `model` name clients see; default: `model`
    dtype: str = "float32"
    device: str = "auto"
    batch_wait_ms: float = 2.0
    limits: Limits = field(default_factory=Limits)
    graceful_timeout_s: float = 30.0
    max_connections: int = 512  # beyond this uvicorn answers 503 (clients retry)
    # a connection must send its request headers within this many seconds (slowloris)
    header_timeout_s: float = 10.0
    max_client_connections: int = 64  # open connections per client address (opd.teachers.server.guard)

    def __post_init__(self):  # before the (slow) model load
        ConnectionLimits(self.header_timeout_s, self.max_client_connections)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def check_exposure(host: str, token: str | None, token_env: str = "OPD_TEACHER_TOKEN") -> None:
    """Refuse to serve a non-loopback address without a bearer token."""
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to bind {host!r} without a bearer token: set the environment variable "
            f"{token_env} (or choose another with --token-env), or bind 127.0.0.1"
        )


class TeacherService:
    """The loaded teacher plus its batcher; what the HTTP layer talks to."""

    def __init__(self, model, tokenizer, *, name: str, limits: Limits, batch_wait_ms: float):
        from opd.modeling.hf import shared_vocab_size, tokenizer_fingerprint

        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.name, self.limits = tokenizer, name, limits
        self.vocab_size = shared_vocab_size(tokenizer, model)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.batcher = Batcher(
            self.model,
            self.vocab_size,
            max_batch_tokens=limits.max_batch_tokens,
            wait_ms=batch_wait_ms,
        )
        self._decoded: list[str] | None = None

    @classmethod
    def load(cls, settings: ServeSettings) -> TeacherService:
        from opd.modeling.hf import load_causal_lm, load_tokenizer, resolve_device

        tokenizer = load_tokenizer(settings.model)
        model = load_causal_lm(
            settings.model, dtype=settings.dtype, device=resolve_device(settings.device)
        )
        return cls(
            model,
            tokenizer,
            name=settings.served_model_name or settings.model,
            limits=settings.limits,
            batch_wait_ms=settings.batch_wait_ms,
        )

    def decoded(self) -> list[str]:
        """Each id decoded on its own, as vLLM fills `decoded_token` (built once, lazily)."""
        if self._decoded is None:
            self._decoded = self.tokenizer.batch_decode([[i] for i in range(self.vocab_size)])
        return self._decoded

    def info(self) -> dict:
        return {
            "object": "opd.info",
            "model": self.name,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.fingerprint,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "limits": self.limits.as_dict(),
            "endpoints": ["/v1/completions", "/opd/v1/score"],
            "batches_run": self.batcher.batches,
        }


async def read_json(request: Request, limits: Limits):
    """The body as JSON, within the size limit and the body timeout (413 / 408 / 400)."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
        raise RequestError(
            413,
            f"request body of {size} bytes exceeds this server's limit of "
            f"{limits.max_body_bytes} bytes",
        )

    async def receive() -> bytes:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise RequestError(
                    413,
                    f"request body exceeds this server's limit of {limits.max_body_bytes} bytes",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(receive(), limits.body_timeout_s)
    except TimeoutError:
        raise RequestError(
            408, f"request body not received within {limits.body_timeout_s:g} s"
        ) from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON in the request body: {err}") from None
    except RecursionError:  # thousands of nested [ or {, within the size limit
        raise RequestError(400, "the request body's JSON is nested too deeply") from None


def create_app(service: TeacherService, token: str | None = None) -> FastAPI:
    """The FastAPI app around a loaded `TeacherService`; `token` guards all but `/health`."""

    @asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        log.info("teacher %s ready (vocab %d)", service.name, service.vocab_size)
        try:
            yield
        finally:  # uvicorn runs this after the requests in flight have been answered
            await service.batcher.stop()

    # No /docs, /redoc or /openapi.json: they would answer without the token.
    app = FastAPI(
        title="opd teacher", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    expected = f"Bearer {token}".encode() if token else None

    @app.exception_handler(RequestError)
    async def _refused(request: Request, err: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if err.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/opd/v1/info", dependencies=guarded)
    async def info():
        return service.info()

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        card = {
            "id": service.name,
            "object": "model",
            "owned_by": "opd",
            "root": service.name,
            "max_model_len": service.limits.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    async def run(work):
        try:
            return await service.batcher.submit(work)
        except RequestError:
            raise
        except Exception as err:
            log.exception("scoring failed")
            raise RequestError(500, f"scoring failed: {type(err).__name__}: {err}") from None

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        job = parse_completion(
            await read_json(request, service.limits), service.limits, service.vocab_size
        )
        if job.model is not None and job.model != service.name:
            raise RequestError(404, f"The model `{job.model}` does not exist.", "model")
        results = await run(job.work) if job.want_logprobs else None
        decoded = service.decoded() if job.want_logprobs else []
        # A sync iterator: Starlette builds each piece in a worker thread, and the event loop
        # serves other requests (and /health) between pieces.
        body = completion_chunks(service.name, job, results, decoded, service.tokenizer)
        return StreamingResponse(body, media_type="application/json")

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request):
        """vLLM's `/tokenize` (`{"prompt", "add_special_tokens"}` -> `{"tokens"}`): clients
        check the server's tokenizer against theirs by it, on vLLM and opd servers alike."""
        body = await read_json(request, service.limits)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or len(prompt) > service.limits.max_seq_len * 64:
            raise RequestError(400, "tokenize needs a 'prompt' string", "prompt")
        specials = bool(body.get("add_special_tokens", True))
        ids = service.tokenizer(prompt, add_special_tokens=specials).input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": service.limits.max_seq_len}

    @app.post("/opd/v1/score", dependencies=guarded)
    async def score(request: Request):
        work = parse_score(
            await read_json(request, service.limits), service.limits, service.vocab_size
        )
        results = await run(work)

        def build() -> str:  # base64 of up to tens of MB: off the event loop
            return json.dumps(score_response(service.name, work, results), separators=(",", ":"))

        return Response(await asyncio.to_thread(build), media_type="application/json")

    return app


def uvicorn_config(app, settings: ServeSettings):
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    guard = ConnectionLimits(settings.header_timeout_s, settings.max_client_connections)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        limit_concurrency=settings.max_connections,
        access_log=False,
        http=guarded_protocol(AutoHTTPProtocol, guard),
    )


def serve(settings: ServeSettings, token_env: str = "OPD_TEACHER_TOKEN") -> int:
    """Load the teacher and serve until SIGINT/SIGTERM (blocking)."""
    import uvicorn

    check_exposure(settings.host, settings.token, token_env)
    service = TeacherService.load(settings)
    server = uvicorn.Server(uvicorn_config(create_app(service, settings.token), settings))
    server.run()
    return 0


class BackgroundServer:
    """uvicorn in a daemon thread, for tests and benchmarks; `port=0` picks a free port."""

    def __init__(self, app, settings: ServeSettings):
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(app, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="opd-serve")

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        self.thread.start()
        for _ in range(int(timeout_s / 0.01)):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            threading.Event().wait(0.01)
        raise RuntimeError("the teacher server did not start")

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful: stop accepting, let requests in flight finish, stop the batcher."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
