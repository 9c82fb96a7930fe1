"""Command-line entry point: `opd demo | train | generate | score | inspect | eval | serve`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opd", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    args = parser.parse_args(argv)
    if args.version:
        from opd import __version__

        print(__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
