"""Safe reading of downloaded tar archives (such as CIFAR-10's binary distribution).

An archive from a mirror is untrusted input: a member named `../x` or `/etc/x`, or a link
pointing elsewhere, would reach outside the archive if anything ever extracted it. Nothing is
extracted: `read_members` returns the wanted members in memory. Only regular files and
directories are accepted, checked with tarfile's `data` filter, which also refuses absolute
and escaping paths; one bad member refuses the whole archive.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from pathlib import Path

from imgclf.errors import DataError

# What the data filter checks escaping paths against when nothing is extracted: any absolute
# directory will do, since only whether a name stays inside it matters.
_NOWHERE = "/nonexistent-extraction-root"


def _check_members(archive: Path, members: list[tarfile.TarInfo], dest: str) -> None:
    for member in members:
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive.name}: refused: member {member.name!r} is not a regular file "
                            "or directory (links and devices are never extracted)")
        if member.name.startswith(("/", "\\")):
            # tarfile's data filter would quietly strip the slash; an archive that
            # asks for an absolute path is not one we want anything from.
            raise DataError(f"{archive.name}: refused: member {member.name!r} has an absolute path")
        try:
            tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            raise DataError(f"{archive.name}: refused: member {member.name!r}: {exc}") from None


def read_members(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The bytes of the regular-file members `names`, read without extracting anything.

    Every member, wanted or not, must pass `_check_members`; a wanted name that is missing is
    a DataError naming it.
    """
    wanted = list(names)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_members(archive, members, _NOWHERE)
            # The last of equal names wins, as it would on extraction.
            by_name = {m.name: m for m in members if m.isfile()}
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise DataError(f"{archive.name}: no member {missing[0]!r} "
                                f"({len(missing)} of the {len(wanted)} expected files are missing)")
            out = {}
            for name in wanted:
                with tar.extractfile(by_name[name]) as fh:
                    out[name] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive.name}: not a readable tar archive ({exc})") from None
    return out
