"""The offline-cache subcommands of `opd`: generate, score, inspect.

    opd generate --teacher T --prompts prompts.jsonl --out cache/ [--topk 64] [--n 4]
    opd generate --endpoint URL [--endpoint URL2 ...] --model NAME --prompts prompts.jsonl --out cache/
    opd score    --teacher T --prompts pairs.jsonl   --out cache/ [--topk 64]
    opd score    --endpoint URL [--endpoint URL2 ...] --tokenizer T --prompts pairs.jsonl --out c/
    opd inspect  cache/ [--samples 3]

Kept out of `opd.cli` so that file stays a list of commands; heavy imports (torch,
transformers) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import json


def _spec(args, mode: str):
    from opd.teachers.cache.generate import CacheSpec

    return CacheSpec(
        mode=mode,
        prompt_field=args.prompt_field,
        completion_field=args.completion_field,
        chat_template=args.chat_template,
        system_prompt=args.system_prompt,
        max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_new_tokens=getattr(args, "max_new_tokens", 128),
        temperature=getattr(args, "temperature", 1.0),
        top_p=getattr(args, "top_p", 1.0),
        top_k=getattr(args, "top_k", 0),
        n=getattr(args, "n", 1),
        topk=args.topk,
        logprob_dtype=args.logprob_dtype,
        seed=args.seed,
        shard_size=args.shard_size,
        teacher_dtype=args.dtype,
        engine=args.engine,
    )


def _run(args, mode: str, urls=(), remote=None) -> int:
    from opd.config.parse import VllmConfig
    from opd.teachers.cache.generate import build_cache

    manifest = build_cache(
        args.tokenizer if urls else args.teacher,
        args.prompts,
        args.out,
        _spec(args, mode),
        batch_size=args.batch_size,
        device=args.device,
        vllm_settings=VllmConfig(
            gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb
        ),
        urls=urls,
        remote=remote,
    )
    print(json.dumps({"out": args.out, "counts": manifest["counts"], "bytes": manifest["bytes"]}))
    return 0


def _run_endpoint(args) -> int:
    from opd.teachers.cache.endpoint import EndpointSettings, build_endpoint_cache, cost_table

    if not args.model:
        raise ValueError("--model is required with --endpoint (the name the server serves)")
    settings = EndpointSettings(
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
        timeout_s=args.timeout_s,
        deadline_s=args.deadline_s,
        max_retries=args.max_retries,
    )
    manifest = build_endpoint_cache(
        [u for given in args.endpoint for u in given.split(",") if u],
        args.model,
        args.prompts,
        args.out,
        _spec(args, "generate"),
        settings,
        api=args.api,
        tokenizer=args.tokenizer,
        stop=args.stop,
    )
    print("\n".join(cost_table(manifest)))
    summary = {k: manifest[k] for k in ("counts", "cost", "errors", "truncated")}
    summary["token_level"] = manifest["tokenizer"]["token_level"]
    print(json.dumps({"out": args.out, **summary}))
    return 0


def _cmd_generate(args) -> int:
    if args.endpoint and args.teacher:
        raise ValueError("give --teacher (a model) or --endpoint (a server), not both")
    if args.endpoint:
        return _run_endpoint(args)
    if not args.teacher:
        raise ValueError("opd generate needs --teacher (a model) or --endpoint (a server)")
    return _run(args, "generate")


def _cmd_score(args) -> int:
    urls = [u for given in args.endpoint for u in given.split(",") if u]
    if urls and args.teacher:
        raise ValueError("give --teacher (a model) or --endpoint (teacher servers), not both")
    if not urls:
        if not args.teacher:
            raise ValueError("opd score needs --teacher (a model) or --endpoint (a server)")
        return _run(args, "score")
    if not args.tokenizer:
        raise ValueError("opd score --endpoint needs --tokenizer (the servers' tokenizer)")
    remote = {"token_env": args.api_key_env, "timeout_s": args.timeout_s}
    return _run(args, "score", urls, remote | {"max_retries": args.max_retries})


def _cmd_inspect(args) -> int:
    from opd.teachers.cache.inspect import inspect_cache

    print(inspect_cache(args.dir, samples=args.samples, tokenizer_path=args.tokenizer))
    return 0


def _common(p: argparse.ArgumentParser, teacher_required: bool = True) -> None:
    p.add_argument(
        "--teacher", required=teacher_required, default="", help="teacher model directory or hub id"
    )
    p.add_argument("--prompts", required=True, help="JSONL, Parquet or a `datasets` directory")
    p.add_argument("--out", required=True, help="cache directory (rerun to resume)")
    p.add_argument("--topk", type=int, default=64, help="teacher top-k stored per token (0: none)")
    p.add_argument("--logprob-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per teacher pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--chat-template", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--system-prompt", default="")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-completion-tokens", type=int, default=512, help="score: truncation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="hf: opd's sampler and a HF forward | vllm: one vLLM engine (opd[vllm])",
    )
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="vllm on GPU: memory share"
    )
    p.add_argument(
        "--kv-cache-gb", type=float, default=0.0, help="vllm: KV cache GiB (CPU default 1)"
    )


def add_cache_commands(sub) -> None:
    """Register `generate`, `score` and `inspect` on the `opd` subparsers."""
    p = sub.add_parser("generate", help="teacher rollouts + log-probs into an offline cache")
    _common(p, teacher_required=False)
    _endpoint_options(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus")
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (not --topk)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("score", help="teacher log-probs of given prompt/completion pairs")
    _common(p, teacher_required=False)
    g = p.add_argument_group("teacher servers instead of a model (--endpoint)")
    g.add_argument("--endpoint", action="append", default=[],
                   help="an `opd serve` or vLLM server; repeat it (or a comma list) for "
                   "replicas: rows spread over them, a dead one's moved to another")  # fmt: skip
    g.add_argument("--tokenizer", default="", help="the servers' tokenizer (local), checked")
    g.add_argument("--api-key-env", default="OPD_TEACHER_TOKEN", help="env var with the token")
    g.add_argument("--timeout-s", type=float, default=60.0, help="one request's limit")
    g.add_argument("--max-retries", type=int, default=5, help="when every server is down")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("inspect", help="review an offline teacher cache")
    p.add_argument("dir", help="cache directory")
    p.add_argument("--samples", type=int, default=3, help="rows to show decoded")
    p.add_argument("--tokenizer", default="", help="decode with this tokenizer (default: teacher)")
    p.set_defaults(func=_cmd_inspect)


def _endpoint_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("an OpenAI-compatible server as the teacher (--endpoint)")
    g.add_argument("--endpoint", action="append", default=[],
                   help="server URL, e.g. http://gpu:8000 (or .../v1); repeat it (or give a "
                   "comma-separated list) for replicas of one teacher: rows are spread over "
                   "them and a dead one's retried on another")  # fmt: skip
    g.add_argument("--model", default="", help="model name the server serves")
    g.add_argument("--api", default="completions", choices=["completions", "chat"],
                   help="chat: the server applies its chat template")  # fmt: skip
    g.add_argument(
        "--tokenizer",
        default="",
        help="local tokenizer the cache's token ids are in (checked against the server's "
        "/tokenize); without it the cache holds text",
    )
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env variable with the key")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--requests-per-minute", type=float, default=0.0, help="0: no limit")
    g.add_argument("--tokens-per-minute", type=float, default=0.0, help="0: no limit")
    g.add_argument("--timeout-s", type=float, default=120.0, help="one attempt's limit")
    g.add_argument("--deadline-s", type=float, default=600.0, help="one request's limit")
    g.add_argument("--max-retries", type=int, default=6, help="after 408/429/5xx/timeouts")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
