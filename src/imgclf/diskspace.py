"""The disk as a stage meets it: enough free space checked before the work starts, output
files allocated before they are mapped, and a full or read-only disk reported in one line.

A memory-mapped output on a full file system fails not with an error but with SIGBUS, the
moment a page is written that the file system cannot back; allocating the whole file first
(posix_fallocate) turns that into ENOSPC at a point where the stage can still say so.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from imgclf.errors import DataError


def human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_free(directory: Path, need: int, what: str) -> None:
    """A DataError, before any work, if `directory`'s file system has less than `need` bytes
    free. `what`: what needs them, for the message, which names the directory's parent (the
    directory itself is usually a stage's temporary one)."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DataError(f"{directory.parent}: {human(free)} free, but {what} needs about {human(need)}; free space "
                        "there or move the project to a larger disk (the previous outputs are as they were)")


def preallocate(path: Path) -> None:
    """Give every byte of `path` its blocks now, so writing through a map of it cannot SIGBUS.

    File systems without fallocate (some network ones) are left as they are.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            if exc.filename is None:
                exc.filename = str(path)
            raise
    finally:
        os.close(fd)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def disk_error(exc: OSError) -> str | None:
    """The one line for an OSError a user fixes on the disk (full, quota, read-only, no
    permission), or None for any other: those are bugs and keep their traceback."""
    where = exc.filename if exc.filename is not None else "writing this stage's outputs"
    if exc.errno in _FULL:
        return (f"{where}: no space left on the device ({exc.strerror}); free space there and rerun "
                "(the previous outputs are as they were, nothing half-written is left)")
    if exc.errno in _NOT_WRITABLE:
        return (f"{where}: cannot write there ({exc.strerror}); make it writable and rerun "
                "(the previous outputs are as they were)")
    return None
