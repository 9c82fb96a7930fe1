"""Atomic checkpoints: safetensors weights loadable with `from_pretrained`, plus trainer state.

A checkpoint is written into a hidden temporary directory and renamed into place, and the
`latest` pointer is replaced atomically after that, so a kill at any moment leaves the
previous checkpoint intact and pointed to. What a kill or a full disk leaves behind
(`.tmp-step-*`, `.old-step-*`, `.latest.tmp-*`) is cleaned by `clean_leftovers`.

The trainer state (optimizer, scheduler, RNG, counters) is stored as `trainer_state.json`
plus its tensors in `trainer_state.safetensors`: loading it parses JSON and safetensors
only, so a planted file in a run directory (shared storage, copied between machines) cannot
run code on `resume=true`. The pickle file of older versions (`trainer_state.pt`) is
refused, never unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from opd.config.paths import OutOfSpace, is_out_of_space  # OutOfSpace: re-exported
from opd.modeling.quiet import transformers_bars_off

STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE_FILE = "trainer_state.pt"  # the pickle of older opd versions: refused
CONFIG_FILE = "opd_config.yaml"
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from as it is; the message says what to do."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite steps or weights); the message names the
    checkpoint to resume from. `opd train` prints it without a traceback."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- trainer state: JSON tree + safetensors, no pickle ----------------------------------------


def _encode(obj, tensors: dict[str, torch.Tensor], seen: set[int]):
    """A JSON-able tree; tensors move to `tensors` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses tensors that share memory
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        key = str(len(tensors))
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors, seen) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors, seen) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not set(obj) & set(_MARKERS):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        items = [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]
        return {"__items__": items}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"trainer state holds a {type(obj).__name__}, which a checkpoint cannot store")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(x, tensors) for x in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_trainer_state(directory: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, set())
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "opd-trainer-state"})
    (directory / STATE_FILE).write_text(json.dumps(tree))


def load_trainer_state(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    check_state_format(ckpt)
    try:
        tree = json.loads((ckpt / STATE_FILE).read_text())
        tensors = load_file(str(ckpt / STATE_TENSORS)) if (ckpt / STATE_TENSORS).exists() else {}
        return _decode(tree, tensors)
    except (json.JSONDecodeError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"the trainer state of checkpoint {ckpt} is damaged ({err}); resume from an "
            "earlier checkpoint (delete this one) or start a new run"
        ) from None


def check_state_format(ckpt: Path) -> None:
    """Refuse, without reading it, a checkpoint whose trainer state is a pickle."""
    ckpt = Path(ckpt)
    if (ckpt / STATE_FILE).exists():
        return
    if (ckpt / LEGACY_STATE_FILE).exists():
        raise CheckpointError(
            f"checkpoint {ckpt} stores its trainer state as {LEGACY_STATE_FILE}, the pickle "
            "format of older opd versions; it is not loaded, because unpickling a file can run "
            f"code. Start a new run from its weights (student.path={ckpt}: optimizer, schedule "
            "and data order start over), or resume it with the opd version that wrote it"
        )
    raise CheckpointError(f"checkpoint {ckpt} has no {STATE_FILE}; it is incomplete")


# -- saving -------------------------------------------------------------------------------


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
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        extra = {"state_dict": model_state} if model_state is not None else {}
        with transformers_bars_off():
            model.save_pretrained(tmp, safe_serialization=True, **extra)
        tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        write_trainer_state(tmp, {**trainer_state, "step": step, "rng": rng_state()})
        if final.exists():  # a previous attempt at this step finished: replace it whole
            old = ckpt_root / f".old-step-{step:07d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write_text(ckpt_root / "latest", final.name)
    except Exception as err:  # a full disk, most often: leave nothing half-written behind
        clean_leftovers(run_dir)
        if is_out_of_space(err):
            last = latest_checkpoint(run_dir)
            then = f"resume (resume=true) from {last}" if last else "run again (no checkpoint yet)"
            raise OutOfSpace(
                errno.ENOSPC,
                f"no space left on device in {ckpt_root} while saving checkpoint {final.name}; "
                f"free space there, then {then}",
            ) from err
        raise
    _prune(ckpt_root, keep, final.name)
    return final


def _prune(ckpt_root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove what killed or failed saves left in `run_dir/checkpoints`; names what it removed.

    A kill between the two renames of a re-save leaves the step's complete previous copy as
    `.old-step-N-*` and no `step-N`: that copy is put back rather than deleted.
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    removed = []
    for old in sorted(ckpt_root.glob(".old-step-*")):
        final = ckpt_root / old.name.removeprefix(".old-")[: len("step-0000000")]
        if not final.exists() and _is_complete(old):
            try:
                os.replace(old, final)
                continue
            except OSError:
                pass
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    for stale in [*ckpt_root.glob(".tmp-step-*"), *ckpt_root.glob(".latest.tmp-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


def _is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).exists() or (ckpt / LEGACY_STATE_FILE).exists()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None. Ignores half-written temporary dirs."""
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if pointer.exists():
        candidate = ckpt_root / pointer.read_text().strip()
        if _is_complete(candidate):
            return candidate
    complete = sorted(p for p in ckpt_root.glob("step-*") if _is_complete(p))
    return complete[-1] if complete else None


def weights_finite(model) -> bool:
    """Whether every parameter this process holds is finite (sharded: its own shards)."""
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local).all()):
            return False
    return True


# -- resuming with the config the checkpoint was written with -------------------------------

# Keys that do not change what the run computes: how long it runs, where and how often it
# writes, evaluation, and how the remote teacher is reached. Any other change breaks exact
# resume and is refused unless listed in `resume_allow_changes`.
RESUME_SAFE_KEYS = frozenset(
    {
        "steps",  # with optim.schedule=constant only (see config_changes)
        "output_dir",
        "save_every",
        "keep_checkpoints",
        "eval_every",
        "eval_size",
        "eval_metric",
        "log_every",
        "device",
        "max_bad_steps",
        "tensorboard",
        "report_to",
        "resume",
        "resume_allow_changes",
        "data.eval",
        "teacher.url",
        "teacher.urls",
        "teacher.overlap",
        "teacher.api_key_env",
        "teacher.timeout_s",
        "teacher.max_retries",
    }
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, current: dict, allowed=()) -> list[tuple[str, object, object]]:
    """`(key, saved, current)` for each key whose change would break exact resume."""
    old, new = _flatten(saved), _flatten(current)
    allowed = set(allowed)

    def ok(key: str) -> bool:
        parts = key.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        if prefixes & allowed:
            return True
        if key == "steps":  # the length of a decaying schedule: it shapes every step's lr
            return old.get("optim.schedule") == new.get("optim.schedule") == "constant"
        return key in RESUME_SAFE_KEYS

    # Keys only one side has (a field added by a newer version) are not compared.
    return [(k, old[k], new[k]) for k in new if k in old and old[k] != new[k] and not ok(k)]


def check_resume(ckpt: Path, current: dict, allowed=()) -> None:
    """Refuse, before any model loads, a resume that would not continue the run exactly."""
    check_state_format(ckpt)
    path = Path(ckpt) / CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is damaged ({err})") from None
    changes = config_changes(saved, current, allowed)
    if changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes)
        keys = ",".join(k for k, _, _ in changes)
        raise CheckpointError(
            f"resume=true, but the config differs from the one checkpoint {ckpt} was written "
            f"with, so the run would not continue as it started: {listed}. Undo the change, or "
            f"accept it with resume_allow_changes=[{keys}]"
        )
