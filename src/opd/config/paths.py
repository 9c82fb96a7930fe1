"""Paths a command writes to, checked before any work: one-line errors naming the path.

`make_dir("output_dir", path)` creates a directory to write into, or says in one line why
it cannot: a component that is a file (`afile/sub`), a symbolic link that dangles or loops,
a device such as /dev/null, no permission. `check_file_target("--out", path)` does the same
for a file a command will write (its directory is created). `OutOfSpace` is the full-disk
error of every writer (training checkpoints, `opd generate`): the CLI exits 4 on it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path


class OutOfSpace(OSError):
    """A write failed for lack of disk space; nothing half-written is left. The message
    names the directory and what to do."""


def is_out_of_space(err: BaseException | None) -> bool:
    """Whether `err` (or what caused it) is a full disk or quota."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        # safetensors (Rust) and torch's zip writer report a full disk only in their text
        if "No space left on device" in text or "StorageFull" in text or "unexpected pos" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def out_of_space(directory: str | Path, label: str, need: int | None, then: str) -> OutOfSpace:
    """The full-disk error of a writer: where it wrote (`label`, e.g. "--out DIR"), how much
    more it needs (when known), what is free there now, and what to do (`then`)."""
    free = free_bytes(directory)
    parts = [f"about {human_bytes(need)} more are needed"] if need else []
    parts += [f"{human_bytes(free)} free now"] if free is not None else []
    said = f" ({'; '.join(parts)})" if parts else ""
    return OutOfSpace(errno.ENOSPC, f"no space left on device in {label}{said}. {then}")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a directory"


def _component_problem(q: Path) -> str | None:
    """What stops `q` being used as a directory; None if it is one or does not exist."""
    try:
        mode = os.stat(q).st_mode
    except FileNotFoundError:
        if os.path.islink(q):
            return f"{q} is a symbolic link to {os.readlink(q)}, which does not exist"
        return None
    except NotADirectoryError:
        return None  # reported at the component that is not a directory
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{q} is a symbolic link that loops ({q} -> {os.readlink(q)})"
        return f"{q}: {err.strerror}"
    if stat.S_ISDIR(mode):
        return None
    return f"{q} is {_kind(mode)}, not a directory"


def dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a directory to write into, or None (it is one, or can be made)."""
    p = Path(path).expanduser()
    for q in [*reversed(p.parents), p]:
        if str(q) in ("", "."):
            continue
        problem = _component_problem(q)
        if problem:
            return problem
    return None


def make_dir(key: str, path: str | Path) -> Path:
    """Create directory `path` (and its parents) to write into; a `ValueError` naming
    `key=path` and what is in the way otherwise."""
    p = Path(path).expanduser()
    problem = dir_problem(p)
    if problem:
        raise ValueError(f"{key}={path}: {problem}; choose a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if is_out_of_space(err):
            raise OutOfSpace(errno.ENOSPC, f"{key}={path}: no space left on device") from None
        raise ValueError(f"{key}={path}: cannot create the directory ({err.strerror})") from None
    return p


def check_file_target(key: str, path: str | Path) -> Path:
    """A file a command will write: its directory exists or is created; the path itself is
    no directory and no dangling or looping link. Devices (/dev/null) are fine."""
    p = Path(path).expanduser()
    if str(p.parent) not in ("", "."):
        make_dir(f"{key} (its directory)", p.parent)
    problem = _component_problem(p)
    if problem and "symbolic link" in problem:
        raise ValueError(f"{key}={path}: {problem}")
    if p.is_dir():
        raise ValueError(f"{key}={path} is a directory; give a file path")
    return p
