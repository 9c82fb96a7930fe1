#!/usr/bin/env bash
# Rollouts beside training on a CUDA machine (issue 28): the overlap of pipelined steps with
# a vLLM rollout server as its own process, student and server on one card (filesystem
# weight pushes: NCCL refuses two ranks on one device), then on two cards if there are two
# (filesystem pushes, then vLLM's NCCL weight transfer).
#
#   bash benchmarks/gpu_async.sh              # from the repo root; results in $OUT or runs/gpu_async
#   STEPS=20 BATCH=32 NEW=64 bash benchmarks/gpu_async.sh
#
# Needs vllm (GPU build) and opd's sources (OPD_SRC, default ./src). Each case is one
# `benchmarks/async_rollouts.py overlap` run: sync vs pipelined step time, overlap, and the
# sampler_logprob_gap that shows every push took effect.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/runs/gpu_async}
mkdir -p "$out"
export PYTHONPATH=${OPD_SRC:-$here/src}:${PYTHONPATH:-}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'
} 2>&1 | tee "$out/env.txt"
gpus=$(nvidia-smi --list-gpus | wc -l)
common=(overlap --device cuda --dtype bfloat16 --steps "${STEPS:-12}" --batch-size "${BATCH:-16}"
        --max-new-tokens "${NEW:-64}" --threads 4)
PYTHONUNBUFFERED=1 python3 "$here/benchmarks/async_rollouts.py" "${common[@]}" \
  --server-gpu 0 --weight-sync filesystem --workdir /tmp/opd-async-1gpu \
  --json "$out/overlap_1gpu_filesystem.json" 2>&1 | tee "$out/overlap_1gpu_filesystem.log"
if [ "$gpus" -ge 2 ]; then  # trainer on GPU 0, server on GPU 1
  for sync in filesystem nccl; do
    PYTHONUNBUFFERED=1 python3 "$here/benchmarks/async_rollouts.py" "${common[@]}" \
      --server-gpu 1 --weight-sync "$sync" --workdir "/tmp/opd-async-2gpu-$sync" \
      --json "$out/overlap_2gpu_$sync.json" 2>&1 | tee "$out/overlap_2gpu_$sync.log"
  done
fi
