"""Helpers for the teacher-server tests: an in-process server on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from opd.modeling.hf import load_causal_lm, load_tokenizer
from opd.teachers.server.app import BackgroundServer, ServeSettings, TeacherService, create_app
from opd.teachers.server.protocol import Limits

TOKEN = "s3cret-token"
LIMITS = Limits(
    max_seq_len=64, max_seqs_per_request=8, max_topk=16, max_batch_tokens=512, body_timeout_s=2.0
)


def start_server(
    model_dir,
    *,
    token: str | None = TOKEN,
    limits: Limits = LIMITS,
    batch_wait_ms: float = 5.0,
    port: int = 0,
    model=None,
    tokenizer=None,
    name: str = "tiny-teacher",
    **settings,
) -> tuple[BackgroundServer, TeacherService]:
    """`settings`: further `ServeSettings` fields (connection limits)."""
    model = model if model is not None else load_causal_lm(str(model_dir))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_dir))
    service = TeacherService(
        model, tokenizer, name=name, limits=limits, batch_wait_ms=batch_wait_ms
    )
    config = ServeSettings(
        model=str(model_dir), port=port, limits=limits, graceful_timeout_s=5, **settings
    )
    return BackgroundServer(create_app(service, token), config).start(), service


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@torch.no_grad()
def local_logprobs(model, seq: list[int], vocab_size: int) -> torch.Tensor:
    """`[len-1, V]` log-probs of positions 1.. of one unpadded sequence: the reference."""
    logits = model(input_ids=torch.tensor([seq])).logits[0, :-1, :vocab_size]
    return torch.log_softmax(logits.float(), dim=-1)


def random_seqs(rng: random.Random, n: int, vocab: int, lo: int = 2, hi: int = 20) -> list:
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def close(a: torch.Tensor | list, b: torch.Tensor | list) -> None:
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float32),
        torch.as_tensor(b, dtype=torch.float32),
        rtol=1e-5,
        atol=1e-5,
    )


def start_serve_processes(model_dir, log_dir, n: int, *, ports=None, token: str | None = TOKEN):
    """`n` `opd serve` processes on 127.0.0.1, started together: `[(process, url)]`.

    Each one's output goes to a file in `log_dir` (a pipe could fill and stall it); limits as
    `LIMITS` but 64 sequences per request. The caller kills them."""
    env = {**os.environ, "OPD_TEACHER_TOKEN": token or ""}
    procs = []
    for i, port in enumerate(ports or [0] * n):
        cmd = [sys.executable, "-m", "opd.cli", "serve", "--model", str(model_dir)]
        cmd += ["--port", str(port), "--served-model-name", "tiny-teacher"]
        cmd += ["--max-seq-len", str(LIMITS.max_seq_len), "--max-topk", str(LIMITS.max_topk)]
        log = Path(log_dir) / f"serve-{i}-{time.monotonic_ns()}.log"
        with log.open("w") as out:
            procs.append(
                (subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT), log)
            )
    started, deadline = [], time.monotonic() + 180
    for proc, log in procs:
        while True:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", log.read_text())
            if found:
                started.append((proc, found.group(1)))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                for p, _ in procs:
                    p.kill()
                raise RuntimeError(f"opd serve did not start; see {log}")
            time.sleep(0.2)
    return started


class Forwarder:
    """A second address of one server: a TCP forwarder on 127.0.0.1, so two URLs of a
    replica set can reach the same (expensive) server, e.g. the session's vLLM one."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.posts = 0  # completion requests forwarded (the start of a request line)
        self.paths: list[str] = []  # the path of every POST forwarded
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            upstream = socket.create_connection(self.target)
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if up:
                    self.posts += data.count(b"POST /v1/completions ")
                    self.paths += [m.decode() for m in re.findall(rb"POST (\S+) HTTP/", data)]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc) -> None:
        self.listener.close()
