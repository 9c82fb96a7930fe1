"""Progress where people look: a bar on a terminal, compact lines in a log file.

On a terminal (stderr is a TTY) a tqdm bar shows step, loss and divergence. Otherwise
(`opd train ... > run.log 2>&1`, a batch job, CI) one line every `log_every` steps:

    step 20/100  loss 0.4123  div 0.3811  tok/s 1834  eta 2m41s

A run's final summary is JSON on stdout (`summary_json`), for people and for `jq`.
"""

from __future__ import annotations

import json
import math
import sys
import time


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """`update(record)` after each step; `close()` at the end (or on an interrupt)."""

    def __init__(
        self,
        total: int,
        start: int,
        *,
        log_every: int,
        enabled: bool = True,
        stream=None,
        divergence_name: str = "div",
    ):
        """`divergence_name`: what the record's `divergence` is per token (`ce` for a
        cross-entropy objective, whose value is no divergence)."""
        self.total, self.start, self.log_every = total, start, log_every
        self.divergence_name = divergence_name
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0, self.tokens = time.perf_counter(), 0
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=start, desc="opd train", dynamic_ncols=True, file=self.stream
            )

    def line(self, record: dict) -> str:
        step = record["step"]
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done else math.nan
        parts = [f"step {step}/{self.total}"]
        for key, name in (("loss", "loss"), ("divergence", self.divergence_name)):
            if isinstance(record.get(key), int | float):
                parts.append(f"{name} {record[key]:.4f}")
        if "eval_accuracy" in record:
            parts.append(f"eval_acc {record['eval_accuracy']:.3f}")
        parts.append(f"tok/s {rate:.0f}")
        parts.append(f"eta {_duration(eta) if math.isfinite(eta) else '?'}")
        return "  ".join(parts)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        self.tokens += int(record.get("tokens", 0))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                {"loss": f"{record['loss']:.4f}", self.divergence_name: f"{record['divergence']:.4f}"}
            )
            return
        step = record["step"]
        if step % self.log_every == 0 or step == self.total or "eval_accuracy" in record:
            print(self.line(record), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_json(result: dict) -> str:
    """The end-of-run summary: the last step's record, readable and machine-parseable."""

    def plain(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # JSON has no NaN/inf
        return value

    return json.dumps({k: plain(v) for k, v in result.items()}, indent=1, default=str)
