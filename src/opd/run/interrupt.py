"""Ctrl-C and SIGTERM end a run cleanly: finish the step, save a checkpoint, say how to resume.

The first signal sets a flag that the loop reads after each optimizer step; it then saves
a checkpoint and raises `Interrupted`. A second signal aborts at once (KeyboardInterrupt)
and the last checkpoint on disk stays intact (checkpoints are written atomically).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells do


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving `checkpoint` (None: nothing saved yet)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        saved = f"saved checkpoint {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"{name} at step {step}: {saved}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)


class StopFlag:
    """Between `install()` and `restore()`, SIGINT/SIGTERM request a stop instead of killing."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> StopFlag:
        """Handle SIGINT/SIGTERM from now on (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        print(
            f"\nopd: {signal.Signals(signum).name} received: finishing this step and saving a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None
