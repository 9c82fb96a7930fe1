"""Command-line entry point.

opd demo [--quick] [--out DIR]          the built-in offline-vs-on-policy comparison
opd train CONFIG.yaml [key=value ...]   one distillation run (see examples/)
opd generate|score --teacher T --prompts F --out DIR   write an offline teacher cache
opd inspect DIR                          review a teacher cache
opd serve --model PATH [--host H --port P]  a teacher server for teacher.kind=remote
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from opd.checkpoint import OutOfSpace, TrainingStopped
from opd.teachers.errors import TeacherUnavailable


def _cmd_train(args) -> int:
    from opd.config import load_config
    from opd.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    if os.environ.get("RANK", "0") == "0":  # multi-process runs (opd.parallel): one line
        print({k: v for k, v in result.items() if k != "totals"})
    return 0


def _cmd_demo(args) -> int:
    from dataclasses import replace

    from opd.demo.run import METHODS, DemoSettings, run_demo

    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise SystemExit(f"opd demo --methods: unknown {unknown}; choose from {sorted(METHODS)}")
    settings = DemoSettings.preset(args.quick)
    changes = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "eval_every": args.eval_every,
    }
    settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    run_demo(
        args.out,
        quick=args.quick,
        cache_dir=args.cache_dir,
        seed=args.seed,
        methods=methods,
        settings=settings,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="Distil a teacher LM into a student.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="run one distillation config")
    p.add_argument("config", nargs="?", help="YAML config (optional: everything can be key=value)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. loss.divergence=jsd loss.beta=0.5"
    )
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser(
        "demo", help="offline KD vs on-policy distillation on a built-in task, on CPU"
    )
    p.add_argument(
        "--quick", action="store_true", help="the same comparison, smaller: about 2 minutes"
    )
    p.add_argument(
        "--out", default="runs/demo", help="output directory (report.md, results.json, plots)"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where built models are cached (default ~/.cache/opd/demo)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--steps", type=int, default=None, help="student updates per method")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per update")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.set_defaults(func=_cmd_demo)
    from opd.cli.cache import add_cache_commands

    add_cache_commands(sub)  # generate, score, inspect: the offline teacher cache
    from opd.cli.serve import add_serve_command

    add_serve_command(sub)  # serve: the remote teacher server
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from opd import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # A config given as key=value only: argparse puts the first override in `config`.
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"opd: error: {err}", file=sys.stderr)
        return 2
    except TeacherUnavailable as err:  # the remote teacher stayed down; checkpoint intact
        print(f"opd: error: {err}", file=sys.stderr)
        return 3
    except (TrainingStopped, OutOfSpace) as err:  # non-finite run or full disk; named ckpt intact
        print(f"opd: error: {err}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
