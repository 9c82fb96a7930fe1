"""Kill a cache-writing command mid-run, as a crash would (tests of exact resume)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from opd.data.cache_format import CacheError, read_manifest


def kill_after_shards(cmd: list[str], out: Path, shards: int, timeout_s: float = 120):
    """Start `cmd`; SIGKILL it once `out`'s manifest lists `shards` shards (or when it ends,
    or after `timeout_s`). Returns (shards in the manifest after the kill, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(read_manifest(out)["shards"]) >= shards:
                break
        except (FileNotFoundError, ValueError, KeyError, CacheError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate()
    return len(read_manifest(out)["shards"]), stdout, stderr
