"""Machine-readable metrics (JSONL; TensorBoard, W&B, trackio via `report_to`) and timers."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path


class PhaseTimer:
    """Accumulates wall time per named phase (generation, teacher scoring, update, ...)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


TRACKER_PACKAGES = {"tensorboard": "opd[tensorboard]", "wandb": "wandb", "trackio": "trackio"}


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`; mirrors scalars to the trackers in
    `report_to` (tensorboard, wandb, trackio; W&B and trackio read their usual environment,
    e.g. WANDB_MODE=offline, WANDB_PROJECT)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        resume_step: int | None = None,
        report_to: tuple[str, ...] = (),
        config: dict | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Lines written after the checkpoint we resume from belong to a lost future.
            kept = [
                line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step
            ]
            _replace_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = self.wandb = self.trackio = None
        run_dir = Path(run_dir)
        name = run_dir.resolve().name
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in report_to:
            import wandb

            # resume="allow" with a stable id: a resumed run continues the same W&B run.
            # Trackers talk on stdout; opd keeps stdout for its JSON summary.
            with redirect_stdout(sys.stderr):
                self.wandb = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", "opd"),
                    name=name,
                    id=os.environ.get("WANDB_RUN_ID") or _run_id(run_dir),
                    dir=str(run_dir),
                    config=config,
                    resume="allow",
                )
        if "trackio" in report_to:
            import trackio

            self.trackio = trackio
            with redirect_stdout(sys.stderr):
                trackio.init(
                    project=os.environ.get("TRACKIO_PROJECT", "opd"),
                    name=name,
                    config=config,
                    resume="allow",
                )

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {
            k: v
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"
        }
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.trackio is not None:
            self.trackio.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        with redirect_stdout(sys.stderr):
            if self.wandb is not None:
                self.wandb.finish()
            if self.trackio is not None:
                self.trackio.finish()


def _run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]


def _replace_text(path: Path, text: str) -> None:
    """Write a temporary file and rename it over `path`: a kill or a full disk midway leaves
    the old history whole (a truncating write would lose steps 1..N for good)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, ValueError, TypeError):
        return 1 << 60


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
