"""`opd generate --endpoint` against a real vLLM OpenAI server: rows/s at concurrency
1 / 4 / 16, and opd's client overhead against the server's own throughput.

    python benchmarks/endpoint_generate.py                        # tiny teacher, vLLM on CPU
    python benchmarks/endpoint_generate.py --rows 128 --max-new-tokens 64
    python benchmarks/endpoint_generate.py --url http://127.0.0.1:8000 --model M --tokenizer M

The server (`vllm.entrypoints.openai.api_server`, float32) runs as its own process on a free
loopback port and is stopped at the end; with `--url` an already running one is used.
"The server's own throughput" is a bare client: the same request bodies (token-id
prompts, the same seeds, top-k log-probs with token ids), the same concurrency, asyncio +
httpx, `json.loads` of each answer and nothing else. The opd run is the whole
`build_endpoint_cache` call: tokenizer probe, prompt encoding, answer checks, shard and
manifest writes. Both make the same completions (same seeds), so they ask the server for
the same work. The two alternate, `--repeats` times; the best of each is reported (a
shared box's noise only slows runs down) with the median of the paired overheads beside
it; overhead = 1 - opd rows/s / bare rows/s (goal <= 10%), with opd's rows/s taken over its
shards (requests, checks, shard and manifest writes: what grows with the rows) and, in
brackets, over the whole call (plus the tokenizer load, the /tokenize probe and prompt
encoding, paid once per run). The client's own CPU time per
row (this process; the server is another) is the noise-free part of the overhead: on a
small box client and server share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from opd.config.parse import DataConfig
from opd.data.rows import Encoder
from opd.modeling.hf import load_tokenizer
from opd.modeling.vocab import end_token_ids
from opd.teachers.cache.endpoint import EndpointSettings, build_endpoint_cache
from opd.teachers.cache.endpoint_answers import request_payload
from opd.teachers.cache.generate import _shard_seed
from opd.teachers.cache.spec import CacheSpec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_teacher(root: Path) -> Path:
    """A teacher vLLM's CPU kernels can run (head dim 32), as the tests use."""
    from vllm_util import save_vllm_pair

    return save_vllm_pair(root)[0]


def payloads(model: str, tokenizer_path: str, prompts: list[str], spec: CacheSpec) -> list[dict]:
    """The bodies `build_endpoint_cache` sends for these prompts (token-level, n=1)."""
    tok = load_tokenizer(tokenizer_path)
    enc = Encoder(tok, DataConfig(max_prompt_tokens=spec.max_prompt_tokens))
    ends = end_token_ids(tokenizer_path, tok, enc.stop_id)
    out = []
    for p, text in enumerate(prompts):
        shard, within = divmod(p, spec.shard_size)
        seed = _shard_seed(spec.seed, shard, within * spec.n) % (2**31 - 1)
        body = request_payload(
            "completions", model, enc.prompt_ids(text), spec, n=1, seed=seed, stop=[],
            token_level=True, end_ids=ends,
        )  # fmt: skip
        out.append(body)
    return out


async def bare(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    """(seconds, completion tokens) for all bodies through a minimal client."""
    slots = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:

        async def one(body):
            async with slots:
                resp = await client.post("/v1/completions", json=body)
                resp.raise_for_status()
                return json.loads(resp.content)["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, sum(tokens)


def opd_run(url, model, tokenizer, prompts_path, spec, concurrency, out):
    """(seconds of the whole call, seconds of its shards, completion tokens)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    m = build_endpoint_cache(
        url, model, prompts_path, out, spec,
        EndpointSettings(api_key_env="", concurrency=concurrency), tokenizer=tokenizer,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert m["tokenizer"]["token_level"] and not m["errors"], (m["tokenizer"], m["errors"])
    shards = sum(s["seconds"] for s in m["shards"])
    return seconds, shards, m["cost"]["completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="", help="a running server (default: start vLLM here)")
    ap.add_argument("--model", default="", help="with --url: the served model name")
    ap.add_argument("--tokenizer", default="", help="with --url: its tokenizer")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="opd_endpoint_bench_"))
    logging_off()
    try:
        if args.url:
            url, model, tokenizer = args.url, args.model, args.tokenizer or args.model
            run(args, url, model, tokenizer, work)
        else:
            from vllm_util import vllm_server

            teacher = build_teacher(work / "models")
            t0 = time.perf_counter()
            with vllm_server(teacher, work / "server.log") as url:
                print(f"vLLM server up in {time.perf_counter() - t0:.0f} s", flush=True)
                run(args, url, str(teacher), str(teacher), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def logging_off() -> None:
    import logging

    logging.getLogger("opd").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")


def run(args, url: str, model: str, tokenizer: str, work: Path) -> None:
    prompts = [f"{i}+{(7 * i) % 13}=" for i in range(args.rows)]
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    spec = CacheSpec(topk=args.topk, max_new_tokens=args.max_new_tokens, n=1, seed=1,
                     shard_size=args.rows, max_prompt_tokens=64)  # fmt: skip
    bodies = payloads(model, tokenizer, prompts, spec)
    asyncio.run(bare(url, bodies[: min(8, len(bodies))], 4))  # warm-up
    print(f"box: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average before {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{args.rows} rows, max_new_tokens {args.max_new_tokens}, top-{args.topk}, "
          f"median of {args.repeats}")  # fmt: skip
    print("| concurrency | bare client rows/s | opd rows/s in shards (whole call) | opd overhead "
          "in shards, best (median of pairs) | client CPU ms/row (bare / opd, whole call) | "
          "completion tokens (bare / opd) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for c in (int(x) for x in args.concurrency.split(",")):
        raw, ours, steady, cpu = [], [], [], {"bare": [], "opd": []}
        for _ in range(args.repeats):
            t = time.process_time()
            s, tok_raw = asyncio.run(bare(url, bodies, c))
            cpu["bare"].append(time.process_time() - t)
            raw.append(args.rows / s)
            t = time.process_time()
            s, in_shards, tok_opd = opd_run(url, model, tokenizer, path, spec, c, work / "cache")
            cpu["opd"].append(time.process_time() - t)
            ours.append(args.rows / s)
            steady.append(args.rows / in_shards)
        r, o, w = max(raw), max(ours), max(steady)
        pairs = statistics.median(1 - b / a for a, b in zip(raw, steady))
        ms = {k: 1000 * min(v) / args.rows for k, v in cpu.items()}
        print(f"| {c} | {r:.2f} | {w:.2f} ({o:.2f}) | {100 * (1 - w / r):+.1f}% "
              f"({100 * pairs:+.1f}%) | {ms['bare']:.1f} / {ms['opd']:.1f} | {tok_raw} / "
              f"{tok_opd} |", flush=True)  # fmt: skip
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
