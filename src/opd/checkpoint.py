"""Atomic checkpoints: safetensors weights loadable with `from_pretrained`, plus trainer state.

A checkpoint is written into a hidden temporary directory and renamed into place, and the
`latest` pointer is replaced atomically after that, so a kill at any moment leaves the
previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import yaml

from opd.quiet import transformers_bars_off

STATE_FILE = "trainer_state.pt"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    import torch  # here, not at the top: finding a checkpoint (preflight) needs no torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    config: dict,
    keep: int = 2,
    model_state: dict | None = None,
) -> Path:
    """`model_state`: full weights gathered from a sharded (FSDP) model; None: the model's own."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {"state_dict": model_state} if model_state is not None else {}
    with transformers_bars_off():
        model.save_pretrained(tmp, safe_serialization=True, **extra)
    tokenizer.save_pretrained(tmp)
    import torch

    torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    (tmp / "opd_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if final.exists():  # a previous attempt at this step finished: replace it whole
        old = ckpt_root / f".old-step-{step:07d}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _atomic_write_text(ckpt_root / "latest", final.name)
    _prune(ckpt_root, keep, final.name)
    return final


def _prune(ckpt_root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Ignores half-written temporary dirs."""
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if pointer.exists():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / STATE_FILE).exists():
            return candidate
    complete = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_FILE).exists())
    return complete[-1] if complete else None


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt} has no {STATE_FILE}; it is incomplete")
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
