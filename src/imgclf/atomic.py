"""Writes that either complete or leave the previous file untouched.

Every output goes to a temporary sibling first and is renamed into place (rename is atomic
on POSIX within one file system), so a run killed at any moment never leaves a truncated
model, metric or data file behind. Outputs get the modes the user's umask allows (a team that
keeps private images under umask 077 keeps its processed data and models private too); an
OSError names the output it was writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    # Read, not set: os.umask() can only be read by setting it, which races with other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _name(exc: OSError, target: Path) -> None:
    if exc.filename is None:  # a failed write() names no file: say which output it was
        exc.filename = str(target)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path in target's directory; rename it onto target on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        exc.filename = str(target.parent)  # not the random name it tried: the directory to fix
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp's file is 0600 whatever the umask: give it what a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        _name(exc, target)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, obj: Any) -> None:
    # Insertion order is deterministic, and keeps per-class figures in class order.
    write_text(target, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        exc.filename = str(target.parent)  # not the random name it tried: the directory to fix
        raise
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's directory is 0700 whatever the umask
        old = None
        if target.exists():
            # Directories cannot be replaced in one rename: move the old one aside first,
            # so at every instant either the old or the new complete directory is in place.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            old.rmdir()
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        _name(exc, target)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
