# Shared by scripts/demo.sh and scripts/test.sh: make .venv and install opd into it.
# The CPU build of PyTorch is installed first and explicitly, so that resolving opd's
# `torch>=2.4` requirement finds it satisfied and never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${OPD_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
.venv/bin/pip install -q -e ".${1:+[$1]}"
