"""Load test of `opd serve`: concurrent clients, vLLM-compatible vs compact endpoint.

    python benchmarks/serve_load.py                          # tiny model, 8 clients x 25 requests
    python benchmarks/serve_load.py --vocab 32000 --topk 32  # a realistic vocabulary size
    python benchmarks/serve_load.py --model /path/to/teacher --device cuda

The server runs as a separate `opd serve` process on a free loopback port (so client and
server do not share a GIL) and is stopped at the end. Each client sends `--requests`
requests one after another, each scoring `--seqs` sequences of `--prompt-len` prompt plus
`--completion-len` completion tokens, asking for the top `--topk` log-probs; clients run
concurrently. Latency is measured at the client from sending the request to having the
answer parsed into arrays (what `RemoteTeacher` does), so response size and parsing count.
The compact endpoint scores only completion positions (its `start`); the vLLM endpoint
returns every prompt position, as vLLM does. Every answer is checked against the first
answer for the same sequences, so a wrong or mixed-up answer fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from opd.teachers.answer_checks import unpack_completions, unpack_opd_score


def build_tiny(root: Path, vocab: int, hidden: int, layers: int) -> Path:
    from opd.cli.demo.tiny import DEFAULT_CHARS, build_char_tokenizer, tiny_causal_lm

    need = max(0, vocab - len(DEFAULT_CHARS) - 3)  # 3 special tokens
    codes = (c for c in range(0x3400, 0x3400 + need + 2048) if not 0xD800 <= c <= 0xDFFF)
    extra = "".join(chr(c) for c, _ in zip(codes, range(need)))
    tok = build_char_tokenizer(DEFAULT_CHARS + extra)
    model = tiny_causal_lm(
        len(tok), hidden=hidden, layers=layers, pad_token_id=tok.pad_token_id, eos_token_id=1
    )
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root / "teacher"


def start_server(model: Path, args, token: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "opd.cli", "serve", "--model", str(model), "--port", "0"]
    cmd += ["--max-topk", str(max(args.topk, 1)), "--device", args.device]
    cmd += ["--max-seqs-per-request", str(args.seqs), "--dtype", args.dtype]
    cmd += ["--batch-wait-ms", str(args.batch_wait_ms)]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "OPD_TEACHER_TOKEN": token}, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"running on (http://\S+:\d+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("opd serve did not start")


def make_request(endpoint: str, seqs: list[list[int]], start: int, k: int) -> tuple[str, dict]:
    if endpoint == "compact":
        return "/opd/v1/score", {"sequences": seqs, "start": [start] * len(seqs), "topk": k}
    payload = {"prompt": seqs, "max_tokens": 0, "echo": True, "prompt_logprobs": k}
    return "/v1/completions", {**payload, "return_token_ids": True}


def parse(endpoint: str, body: bytes, seqs, start: int, k: int) -> np.ndarray:
    """Token log-probs of the completion positions, `[seqs, completion_len]`."""
    data = json.loads(body)
    # the client's own checked readers (opd.teachers.answer_checks), as a training run reads
    if endpoint == "compact":
        parts = unpack_opd_score("server", data, [len(s) - start for s in seqs], k, None)
    else:
        parts = unpack_completions("server", data, seqs, [start] * len(seqs), k, None)
    return np.array([np.asarray(p[0], dtype=np.float32) for p in parts])


async def run_endpoint(url: str, token: str, endpoint: str, work: list, args) -> dict:
    start, k = args.prompt_len, args.topk
    reference: dict[int, np.ndarray] = {}
    latencies: list[float] = []
    sizes: list[int] = []

    async def client(http: httpx.AsyncClient, c: int):
        for i in range(args.requests):
            w = (c * args.requests + i) % len(work)
            path, payload = make_request(endpoint, work[w], start, k)
            body = json.dumps(payload).encode()
            t0 = time.perf_counter()
            resp = await http.post(path, content=body)
            resp.raise_for_status()
            got = parse(endpoint, resp.content, work[w], start, k)
            latencies.append(time.perf_counter() - t0)
            sizes.append(len(resp.content))
            if w in reference:
                assert np.allclose(got, reference[w], atol=1e-5), "answers differ"
            else:
                reference[w] = got

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=120, limits=limits, trust_env=False
    ) as http:
        await client(http, 0)  # warm-up (not measured)
        latencies.clear()
        sizes.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(args.clients)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    n = len(lat)
    scored = n * args.seqs * args.completion_len
    return {
        "endpoint": endpoint,
        "requests": n,
        "req_per_s": n / wall,
        "scored_tokens_per_s": scored / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(n - 1, int(0.99 * n))],
        "response_kb": statistics.mean(sizes) / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="teacher directory (default: a tiny random model)")
    p.add_argument("--vocab", type=int, default=0, help="tiny model vocabulary (0: 84 chars)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=25, help="per client")
    p.add_argument("--seqs", type=int, default=8, help="sequences per request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--endpoints", nargs="+", default=["vllm", "compact"])
    args = p.parse_args()

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        model = (
            Path(args.model)
            if args.model
            else build_tiny(Path(tmp), args.vocab, args.hidden, args.layers)
        )
        from opd.modeling.hf import load_tokenizer

        vocab = len(load_tokenizer(str(model)))
        rng = random.Random(0)
        length = args.prompt_len + args.completion_len
        work = [
            [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(args.seqs)]
            for _ in range(16)
        ]
        proc, url = start_server(model, args, token)
        try:
            rows = [asyncio.run(run_endpoint(url, token, e, work, args)) for e in args.endpoints]
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# {vars(args)}")
    print(f"{'endpoint':>9} {'req/s':>8} {'tok/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'resp KB':>8}")
    for r in rows:
        print(
            f"{r['endpoint']:>9} {r['req_per_s']:8.1f} {r['scored_tokens_per_s']:9.0f} "
            f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['response_kb']:8.1f}"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
