"""The `opd` command line: demo, train, eval, config, generate, score, inspect, serve."""

from opd.cli.main import main

__all__ = ["main"]
