#!/usr/bin/env bash
# On-policy distillation step throughput, opd against TRL 1.16's DistillationTrainer, on a
# CUDA GPU with real model shapes (issue 10): a Qwen3-1.7B-shaped teacher and a
# Qwen3-0.6B-shaped student, random-initialised from transformers' Qwen3Config (nothing is
# downloaded), bf16 weights, batch 32, 48 new tokens, reverse KL. Records tokens/s and
# peak memory (torch.cuda.max_memory_allocated) per side, plus the loss/gradient check.
#
#   bash benchmarks/gpu.sh                    # from the repo root; results in $OUT or runs/gpu
#   ROUNDS=3 STEPS=10 bash benchmarks/gpu.sh
#
# Packages missing on the GPU machine (trl, datasets, ...) can be put as wheels in .whl/
# (see benchmarks/README.md); they are installed into /tmp/site and take precedence.
# OPD_SRC points at the opd sources to use (default: ./src).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/runs/gpu}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  wheels=$(ls .whl/*.whl | grep -v '/pyarrow-')
  # datasets 5 needs pyarrow >= 24: install the carried one only if the machine's is older.
  python3 -c 'import pyarrow, sys; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)' 2>/dev/null \
    || wheels="$wheels $(ls .whl/pyarrow-*.whl 2>/dev/null)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=${OPD_SRC:-$here/src}:${PYTHONPATH:-}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  python3 -c 'import trl, datasets; print("trl", trl.__version__, "datasets", datasets.__version__)'
} 2>&1 | tee "$out/env.txt"
sides=ours,trl
python3 -c 'import trl' 2>/dev/null || sides=ours  # still time our side if TRL cannot load
size=${SIZE:-qwen3}  # SIZE=tiny DEVICE=cpu: a dry run of this script without a GPU
PYTHONUNBUFFERED=1 python3 "$here/benchmarks/onpolicy_vs_trl.py" --size "$size" \
  --device "${DEVICE:-cuda}" --rounds "${ROUNDS:-2}" --steps "${STEPS:-5}" --warmup 2 \
  --threads "${THREADS:-4}" --sides "$sides" --workdir /tmp/opd-gpu \
  --json "$out/onpolicy_$size.json" 2>&1 | tee "$out/onpolicy_$size.log"
# Student sampling, opd's samplers vs a colocated vLLM engine (Qwen3-0.6B shape, bf16).
# Needs vllm==0.32.0 on the machine (`pip install -e ".[vllm]"`, or its wheels in .whl/).
if python3 -c 'import vllm' 2>/dev/null; then
  PYTHONUNBUFFERED=1 python3 "$here/benchmarks/vllm_sampling.py" --size "$size" \
    --device "${DEVICE:-cuda}" --dtype bfloat16 --rounds "${ROUNDS:-2}" --threads "${THREADS:-4}" \
    --workdir /tmp/opd-gpu --json "$out/vllm_sampling_$size.json" 2>&1 | tee "$out/vllm_sampling_$size.log"
else
  echo "vllm is not installed: benchmarks/vllm_sampling.py skipped" | tee "$out/vllm_sampling_$size.log"
fi
