"""`opd serve` against a slowloris flood and an amplifying request (issue 18's figures).

    python benchmarks/serve_hardening.py                       # this checkout
    PYTHONPATH=/path/to/old/src python benchmarks/serve_hardening.py   # an older opd

The server runs as its own `opd serve` process on a loopback port with a tiny random model
(vocabulary 84) and its default limits (`--header-timeout` 10 s, `--max-client-connections`
64, `--max-connections` 512, `--max-logprobs-per-request` 2^19).

1. Flood: `--stalled` connections (the issue used 520; the server's `--max-connections`
   is 512) each send half a request header and stall; then `--good` authenticated requests,
   each on a new connection, are sent one after another. Printed: how many were answered
   200, how many stalled connections the server still held right after, and how long until
   it had closed them all.
2. Amplification: the largest `/v1/completions` answer the default limits allow with k=64
   (2 sequences x 4,000 tokens = 519,870 log-probs; 2^19 is the limit), with a thread
   polling `/health` every 10 ms meanwhile. Printed: body size, request time and the
   slowest `/health`. Then the issue's request (16 x 1,024 tokens, k=64): status and size.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import build_tiny

PARTIAL = b"POST /opd/v1/score HTTP/1.1\r\nHost: x\r\nContent-Le"


def start(model: Path, token: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "opd.cli", "serve", "--model", str(model), "--port", "0"]
    cmd += ["--max-topk", "64"]
    env = {**os.environ, "OPD_TEACHER_TOKEN": token}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"running on (http://\S+:\d+)", line)
        if found:  # keep draining the log so the server never blocks on it
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("opd serve did not start")


def closed(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(max(wait_s, 0.0001))
    try:
        return sock.recv(1024) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except ConnectionResetError:
        return True


def flood(url: str, token: str, stalled_n: int, good_n: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    stalled = []
    for _ in range(stalled_n):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(PARTIAL)
        stalled.append(sock)
    time.sleep(0.5)
    codes = []
    for i in range(good_n):
        with httpx.Client(base_url=url, timeout=10) as http:
            r = http.post(
                "/opd/v1/score",
                json={"sequences": [[5, 6, 7, 8 + i % 50]], "topk": 4},
                headers={"Authorization": f"Bearer {token}"},
            )
            codes.append(r.status_code)
    held = sum(not closed(s, 0) for s in stalled)
    start = time.monotonic()
    open_socks = [s for s in stalled if not closed(s, 0)]
    while open_socks and time.monotonic() - start < 15:
        open_socks = [s for s in open_socks if not closed(s, 0.05)]
    for s in stalled:
        s.close()
    gone = (
        f"{time.monotonic() - start:.1f} s" if not open_socks else f"{len(open_socks)} open at 15 s"
    )
    print(
        f"flood: {stalled_n} stalled; good requests {codes.count(200)}/{good_n} answered 200 "
        f"(others: {sorted(set(codes) - {200})}); stalled still held after them: {held}; "
        f"all closed after: {gone}"
    )


def amplification(url: str, token: str, seqs: int, length: int) -> None:
    slowest, stop = [0.0], threading.Event()

    def poll():
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                http.get("/health")
                slowest[0] = max(slowest[0], time.perf_counter() - t0)
                time.sleep(0.01)

    prompt = [[3 + (i * 7 + j) % 80 for j in range(length)] for i in range(seqs)]
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "prompt_logprobs": 64}
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as http:
        r = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"})
    took = time.perf_counter() - t0
    stop.set()
    poller.join()
    values = seqs * (length - 1) * 65
    print(
        f"completions {seqs} x {length} tokens, k=64 ({values:,} log-probs): HTTP "
        f"{r.status_code}, {len(r.content) / 1e6:.1f} MB in {took:.2f} s; slowest /health "
        f"meanwhile {slowest[0] * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stalled", type=int, default=520)
    parser.add_argument("--good", type=int, default=20)
    args = parser.parse_args()
    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp), vocab=84, hidden=64, layers=2)
        proc, url = start(model, token)
        try:
            flood(url, token, args.stalled, args.good)
            amplification(url, token, 2, 4000)
            amplification(url, token, 16, 1024)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
