"""One writer per run directory: an exclusive `flock` on `output_dir/.opd-run.lock`.

Two `opd train` on one `output_dir` interleave checkpoints (one's leftover cleaning deletes
the other's save in progress) and duplicate steps in metrics.jsonl. So a training run, from
preflight to its last checkpoint, and `opd eval --out` into a run directory, hold the
directory's lock; a second writer is refused at once, naming the holder's PID, host and
command (written into the lock file).

A lock left by a killed process is no lock: the kernel drops a `flock` when its holder dies,
so the next run takes it over (and says whose it was). The file itself is never deleted:
removing it while another process waits on the old inode would let two processes each lock
a different file. On shared storage (NFS) Linux maps `flock` to byte-range locks the server
arbitrates, so two hosts exclude each other as well.

    hold_run_dir(out, "opd train")     # taken for this process (again: a no-op)
    release_run_dir(out)               # dropped (train() does this when it returns)
    with run_dir_lock(out, "opd eval"): ...
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from opd.config.paths import make_dir

log = logging.getLogger("opd")

LOCK_FILE = ".opd-run.lock"
_held: dict[str, object] = {}  # resolved directory -> the open lock file of this process


class RunDirBusy(ValueError):
    """Another process writes this run directory; the message names it."""


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def _describe(info: dict) -> str:
    parts = [f"PID {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("command"):
        parts.append(f"({info['command']}")
        parts[-1] += f", since {info['started']})" if info.get("started") else ")"
    return " ".join(parts)


def _read(fh) -> dict:
    fh.seek(0)
    try:
        info = json.loads(fh.read() or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def hold_run_dir(directory: str | Path, purpose: str, key_name: str = "output_dir") -> None:
    """Lock `directory` (created if missing) for this process until `release_run_dir`;
    `RunDirBusy` at once if another process holds it. `key_name` names the directory in
    path errors (`output_dir`, `--out`)."""
    directory = Path(directory)
    key = _key(directory)
    if key in _held:
        return
    make_dir(key_name, directory)
    path = directory / LOCK_FILE
    fh = open(path, "a+")  # noqa: SIM115 - held open for the run's life
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fh)
            host = info.get("host")
            note = ""
            if host == socket.gethostname() and not _alive(info.get("pid")):
                note = (
                    "; that process has exited, but one it started still holds the lock "
                    f"(`fuser {path}` names it)"
                )
            raise RunDirBusy(
                f"output directory {directory} is in use by {_describe(info)}{note}; wait for "
                "it to finish, or choose another output_dir"
            ) from None
        stale = _read(fh)
        if stale.get("pid"):
            log.info("%s: taking over the lock left by %s (it ended)", directory, _describe(stale))
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "command": purpose,
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "argv": sys.argv[:8],
                }
            )
            + "\n"
        )
        fh.flush()
    except BaseException:
        fh.close()
        raise
    _held[key] = fh


def release_run_dir(directory: str | Path) -> None:
    """Drop this process's lock of `directory` (no-op if it holds none). The file is
    emptied, not deleted (see the module doc)."""
    fh = _held.pop(_key(Path(directory)), None)
    if fh is None:
        return
    with contextlib.suppress(OSError):
        fh.seek(0)
        fh.truncate()
        # explicit: a forked child (a data loader worker) may share the open file
        fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


def is_run_dir(directory: str | Path) -> bool:
    """Whether `directory` is (or was) a training run's output directory."""
    d = Path(directory)
    return (d / LOCK_FILE).exists() or (d / "checkpoints").is_dir() or (d / "metrics.jsonl").exists()


def is_main_process() -> bool:
    """Rank 0 of a multi-process run (torchrun / accelerate set RANK), or a lone process:
    the one that holds a run directory's lock for all ranks."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_dir_lock(directory: str | Path, purpose: str, key_name: str = "output_dir"):
    """Hold `directory` for the block; released after it, unless it was held before."""
    held_before = _key(Path(directory)) in _held
    hold_run_dir(directory, purpose, key_name)
    try:
        yield
    finally:
        if not held_before:
            release_run_dir(directory)
