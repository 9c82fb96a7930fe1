"""`opd serve`: the command line of the teacher server (see `opd.teachers.server`)."""

from __future__ import annotations

import os


def _cmd_serve(args) -> int:
    from opd.teachers.server.app import ServeSettings, check_exposure, serve
    from opd.teachers.server.protocol import Limits

    token = os.environ.get(args.token_env) or None
    check_exposure(args.host, token, args.token_env)  # before the (slow) model load
    limits = Limits(
        max_seq_len=args.max_seq_len,
        max_seqs_per_request=args.max_seqs_per_request,
        max_topk=args.max_topk,
        max_batch_tokens=args.max_batch_tokens,
        body_timeout_s=args.body_timeout,
        max_logprobs_per_request=args.max_logprobs_per_request,
    )
    settings = ServeSettings(
        model=args.model,
        host=args.host,
        port=args.port,
        token=token,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        device=args.device,
        batch_wait_ms=args.batch_wait_ms,
        limits=limits,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        max_client_connections=args.max_client_connections,
    )
    return serve(settings, token_env=args.token_env)


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="serve a teacher model that scores token sequences")
    p.add_argument("--model", required=True, help="teacher model directory (or hub id)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--token-env",
        default="OPD_TEACHER_TOKEN",
        help="environment variable holding the bearer token (required off loopback)",
    )
    p.add_argument("--served-model-name", default="", help="`model` name clients see")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens/forward")
    p.add_argument("--max-seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--max-seqs-per-request", type=int, default=256)
    p.add_argument("--max-topk", type=int, default=64, help="largest top-k a request may ask")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="time to gather a batch")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a body")
    p.add_argument(
        "--max-logprobs-per-request",
        type=int,
        default=1 << 19,
        help="scored positions x (k+1) one request may ask for (bounds the response size)",
    )
    p.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds to receive request headers"
    )
    p.add_argument("--max-connections", type=int, default=512, help="beyond this: 503")
    p.add_argument(
        "--max-client-connections", type=int, default=64, help="open connections per client"
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_serve)
