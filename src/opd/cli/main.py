"""Command-line entry point: `opd COMMAND --help` tells each command's options.

opd demo [--quick]                         offline KD vs on-policy on a built-in task, on CPU
opd train [CONFIG.yaml] [key=value ...]    one distillation run (`opd config` lists every key)
opd eval [CONFIG.yaml] [key=value ...]     score a model on data.eval (metric, loss, divergence)
opd config [SECTION | WORD]                every config key: type, default, allowed values, doc
opd generate|score --teacher T --prompts F --out DIR   write an offline teacher cache
opd inspect DIR                            review a teacher cache
opd serve --model PATH [--host H --port P] a teacher server for teacher.kind=remote
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from opd.run.interrupt import Interrupted

EPILOG = """\
exit codes:
  0    done
  2    a mistake in the command, config, data or environment; the message names the key
       or path and what to do
  3    the teacher server stayed down; the last checkpoint is intact: rerun with resume=true
  4    training stopped on non-finite steps, or the disk is full; the message names the
       checkpoint to resume from
  130  stopped by Ctrl-C (143: SIGTERM) after saving a checkpoint; the resume command is printed
  1    anything else is a bug in opd: please report it with the traceback

optional features and their extras (pip install 'opd[EXTRA]'):
  serve        opd serve, teacher.kind=remote
  data         Parquet files and `datasets` directories as data.train / data.eval
  lora         lora.enabled=true
  dist         multi-GPU runs under torchrun / accelerate launch
  tensorboard  report_to=[tensorboard]
  wandb        report_to=[wandb]   (offline: WANDB_MODE=offline)
  trackio      report_to=[trackio]
"""

TRAIN_USAGE = """\
A run is a YAML file and/or dotted key=value overrides; the file's values win over a preset,
overrides win over the file. Values are typed as in YAML (1e-5, true, [a, b]); a text key
takes the text as written (data.system_prompt=Note: be brief).

  opd train preset=gkd student.path=S teacher.path=T data.train=rows.jsonl
  opd train examples/qwen3_gkd.yaml steps=200 loss.beta=0.3 --print-config

The run writes output_dir/config.yaml (the resolved config), metrics.jsonl and checkpoints/;
progress goes to stderr, the final summary (JSON) to stdout.

config keys:
"""


def _cmd_train(args) -> int:
    from opd.config.parse import config_to_dict, load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    from opd.run.preflight import preflight

    checked = preflight(config)  # before torch is even imported: mistakes fail in a second
    from opd.run.loop import train
    from opd.run.progress import summary_json
    from opd.run.setup import build_run

    run = build_run(checked.config, checked)
    result = train(checked.config, run)
    run.world.close()
    if os.environ.get("RANK", "0") == "0":  # multi-process runs (opd.run.world): one summary
        print(summary_json(result))
    return 0


def _cmd_config(args) -> int:
    from opd.config.docs import format_keys

    print(format_keys(args.query))
    return 0


def _cmd_demo(args) -> int:
    from dataclasses import replace

    from opd.cli.demo.run import METHODS, DemoSettings, run_demo

    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(METHODS))
    if unknown:
        raise ValueError(f"opd demo --methods: unknown {unknown}; choose from {sorted(METHODS)}")
    settings = DemoSettings.preset(args.quick)
    changes = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "eval_every": args.eval_every,
        "seeds": args.seeds,
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


def _add_train(sub) -> None:
    from opd.config.docs import format_keys

    p = sub.add_parser(
        "train",
        help="run one distillation config",
        description=TRAIN_USAGE + format_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="YAML config (optional: everything can be key=value)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. loss.divergence=jsd loss.beta=0.5"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset + file + overrides) as YAML and exit",
    )
    p.set_defaults(func=_cmd_train)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="offline KD vs on-policy distillation on a built-in task, on CPU"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the same comparison, smaller: about 2 minutes, 2 seeds (wide intervals)",
    )
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output directory: report.md, results.json, plots (default: runs/demo)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where built models are cached (default ~/.cache/opd/demo)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the models, data and first training run"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="training seeds per method (default 10, --quick 2): more seeds, narrower intervals",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated, from seqkd, supervised_kd, offline_rkl, on_policy_rkl, on_policy "
        "(default: supervised_kd,offline_rkl,on_policy_rkl)",
    )
    p.add_argument("--steps", type=int, default=None, help="student updates per method")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per update")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd",
        description="Distil a teacher LM into a student.\n\n" + __doc__.split("\n\n")[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_train(sub)
    from opd.cli.eval import add_eval_command

    add_eval_command(sub)
    p = sub.add_parser(
        "config", help="list every config key with its type, default, allowed values and doc"
    )
    p.add_argument("query", nargs="?", default="", help="a section (loss) or part of a key (lr)")
    p.set_defaults(func=_cmd_config)
    from opd.cli.cache import add_cache_commands

    add_cache_commands(sub)  # generate, score, inspect: the offline teacher cache
    from opd.cli.serve import add_serve_command

    add_serve_command(sub)  # serve: the remote teacher server
    return parser


def exit_code(err: BaseException) -> int | None:
    """2 for what a user can fix (message only), 3 for a teacher or rollout server that
    stayed down, None for anything else (a bug: the traceback is shown)."""
    from opd.config.extras import INSTALL, MissingExtra

    # opd.teachers.errors, opd.sampling.vllm_server, opd.teachers.cache.endpoint_http;
    # checked by name, torch-free
    if type(err).__name__ in ("TeacherUnavailable", "RolloutServerError", "EndpointUnavailable"):
        return 3
    if type(err).__name__ in ("TrainingStopped", "OutOfSpace"):  # opd.run.checkpoint, opd.config.paths
        return 4  # a non-finite run or a full disk; the named checkpoint is intact
    if isinstance(err, ModuleNotFoundError):
        return 2 if (err.name or "").split(".")[0] in INSTALL else None
    user_errors = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError)
    return 2 if isinstance(err, (*user_errors, MissingExtra)) else None


def error_message(err: BaseException) -> str:
    if isinstance(err, ModuleNotFoundError):
        from opd.config.extras import install_hint

        return f"{err}: {install_hint(err.name)}"
    return str(err)


def resume_command(argv: list[str]) -> str:
    kept = [a for a in argv if not a.startswith("resume=")]
    return shlex.join(["opd", *kept, "resume=true"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from opd.modeling.quiet import quiet_http_logs

    quiet_http_logs()
    parser = build_parser()
    # key=value overrides may come after an option (`opd eval cfg.yaml --model M steps=2`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
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
    code = _run_command(args, argv)
    if args.command == "train" and os.environ.get("WORLD_SIZE", "1") != "1":
        # a rank of a multi-process run skips interpreter teardown (opd.run.world.exit_rank)
        from opd.run.world import exit_rank

        exit_rank(code)
    return code


def _run_command(args, argv: list[str]) -> int:
    """The command's exit code; a user's mistake is one line, not a traceback."""
    try:
        return args.func(args)
    except Interrupted as err:
        if os.environ.get("RANK", "0") == "0":  # every rank stopped at this step; one says so
            print(f"opd: stopped: {err}", file=sys.stderr)
            if args.command == "train":
                print(f"opd: to continue: {resume_command(argv)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("opd: interrupted; nothing was saved by this command", file=sys.stderr)
        return 130
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"opd: error: {error_message(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
