#!/usr/bin/env bash
# Install opd with its test extras into .venv (CPU PyTorch) and run lint + the test suite.
source "$(dirname "$0")/_env.sh" dev
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest "$@"
