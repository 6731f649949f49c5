"""Durable outputs: every file and folder the plugin writes is written beside its target, flushed to disk,
renamed over it, and its folder's entry flushed too. A crash or power loss then leaves the old output or
the new one, never half of one or an empty file; the next writer removes what a killed one left.

Only the standard library: soup.py (no torch) and checkpoints.py (merged model folders) both use it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace the file `path` with `data`: a temporary file beside it (this host and process in its name),
    fsynced, renamed over it, the folder fsynced. Temporary files of killed writers of this host go first."""
    path = Path(path)
    tmp = temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def temporary(path: Path) -> Path:
    """`.NAME.tmp-HOST-PID` beside path, for a writer that needs a file name (matplotlib, csv): write it,
    then `replace_durably` it over path. Removes such files of this host whose process is gone."""
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    for stale in path.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix) :]
        if pid.isdigit() and not alive(int(pid)):
            stale.unlink(missing_ok=True)
    return path.parent / f"{prefix}{os.getpid()}"


def replace_durably(tmp: Path, path: Path) -> None:
    """fsync the finished file `tmp`, rename it over `path`, fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): no moment where either is missing.
    False where the C library or the filesystem cannot (then the caller moves things one at a time)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def alive(pid: int) -> bool:
    """Whether a process of this host with that id runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
