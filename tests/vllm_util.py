"""Shared by the vLLM tests: models vLLM's CPU kernels can run, and engine settings.

vLLM's CPU attention has kernels for head sizes 32, 64, ... only, so these tiny models use
head dimension 32 (the shared `tiny_pair` uses 16). One engine per model is started per
test session (`opd.sampling.vllm` reuses engines), about 20-30 s each on 2 cores.
"""

import importlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli.demo.tiny import save_tiny_pair


def vllm_or_skip():
    """The vllm module; skips the calling test module when it is missing, except where
    OPD_REQUIRE_VLLM=1 (scripts/test.sh sets it after installing vLLM: CI must run these)."""
    if os.environ.get("OPD_REQUIRE_VLLM") == "1":
        return importlib.import_module("vllm")
    return pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'opd[vllm]')")


# 256 MiB of KV cache: plenty for these models, small beside the other tests' memory.
SETTINGS = {"kv_cache_gb": 0.25}


def save_vllm_pair(root: Path) -> tuple[Path, Path]:
    """(teacher, student) with head dim 32; the teacher's head scaled up to be peaked."""
    teacher, student = save_tiny_pair(
        root,
        teacher_kw={"hidden": 64, "heads": 2, "layers": 2},
        student_kw={"hidden": 32, "heads": 1, "layers": 2},
    )
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(teacher)
    return teacher, student
