"""Which optional feature needs which extra, said plainly when it is missing.

serve        opd serve, teacher.kind=remote,                fastapi, uvicorn, httpx
             opd generate --endpoint
data         Parquet files and `datasets` directories       datasets, pyarrow
lora         lora.enabled=true                              peft
dist         torchrun / accelerate launch (WORLD_SIZE > 1)  accelerate
tensorboard  report_to=[tensorboard]                        tensorboard
vllm         sampling or scoring with vLLM                  vllm
wandb        report_to=[wandb]                              wandb
trackio      report_to=[trackio]                            trackio
"""

from __future__ import annotations

import importlib.util

# top-level module -> what to install
INSTALL = {
    "fastapi": "opd[serve]",
    "uvicorn": "opd[serve]",
    "httpx": "opd[serve]",
    "datasets": "opd[data]",
    "pyarrow": "opd[data]",
    "peft": "opd[lora]",
    "accelerate": "opd[dist]",
    "tensorboard": "opd[tensorboard]",
    "vllm": "opd[vllm]",
    "wandb": "opd[wandb]",
    "trackio": "opd[trackio]",
}


class MissingExtra(RuntimeError):
    """An optional dependency a feature needs is not installed."""


def install_hint(module: str) -> str:
    package = INSTALL.get(module.split(".")[0], module.split(".")[0])
    return f"pip install '{package}'"


def missing_message(module: str, feature: str) -> str:
    return f"{feature} needs the Python package {module!r}: {install_hint(module)}"


def require(module: str, feature: str) -> None:
    """Raise MissingExtra naming `feature` and the install command if `module` is absent."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules[module] = None
        found = False
    if not found:
        raise MissingExtra(missing_message(module, feature))
