#!/usr/bin/env bash
# Install opd with its test extras and vLLM into .venv (CPU PyTorch, CPU vLLM) and run lint +
# the test suite. OPD_VLLM=0 skips the vLLM install (its tests then skip).
source "$(dirname "$0")/_env.sh" dev
source "$(dirname "$0")/_vllm.sh"
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest "$@"
