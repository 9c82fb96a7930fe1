"""Checks on model paths and the device, before any model loads (no torch import)."""

from __future__ import annotations

from pathlib import Path

# Any one of these makes a directory loadable with AutoTokenizer.from_pretrained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


MODEL_FILES = ("config.json", "adapter_config.json")


def looks_local(path: str) -> bool:
    """A path (not a hub id such as `Qwen/Qwen3-1.7B`): absolute, relative, `~`, or deeper."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def check_model_path(key: str, path: str, *, tokenizer: bool = True) -> None:
    """A local model directory exists and holds a config and (if asked) tokenizer files."""
    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            raise FileNotFoundError(
                f"{key}={path}: no such directory; give a model directory (config.json, "
                "weights, tokenizer files) or a hub id such as Qwen/Qwen3-1.7B"
            )
        return  # a hub id: resolved (or refused) by transformers when it loads
    if not local.is_dir():
        raise ValueError(f"{key}={path} is a file; give the model's directory")
    if not any((local / name).is_file() for name in MODEL_FILES):
        raise ValueError(
            f"{key}={path} has no config.json: not a saved model (save it with "
            "model.save_pretrained(dir))"
        )
    if tokenizer and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{key}={path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer next to the weights with tokenizer.save_pretrained(dir)"
        )


def check_device(name: str) -> None:
    if name in ("auto", "cpu"):
        return
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device={name} but this machine has no CUDA device (or this torch build has "
                "no CUDA); use device=cpu or device=auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ValueError(f"device={name} but this machine has {count} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device=mps but MPS is not available here; use device=cpu")
