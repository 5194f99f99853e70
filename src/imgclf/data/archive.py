"""Safe reading of downloaded tar archives (such as CIFAR-10's binary distribution).

An archive from a mirror is untrusted input: a member named `../x` or `/etc/x`, or a link
pointing elsewhere, would reach outside the archive if anything ever extracted it. Nothing is
extracted: `read_members` returns the wanted members in memory. Only regular files and
directories are accepted, checked with tarfile's `data` filter, which also refuses absolute
and escaping paths; one bad member refuses the whole archive.
"""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from imgclf.errors import DataError
from imgclf.redact import quoted

MIB = 2**20
# Every way a damaged tar or zip (any compression) fails while it is read: tarfile and zipfile
# leave the decompressors' own errors (lzma's, zlib's; bz2's are OSError) unwrapped.
READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError)
# The zip methods Python's zipfile decodes; others (Deflate64, PPMd, ...) raise NotImplementedError.
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


@dataclass(frozen=True)
class Limits:
    """What an archive may hold before it is refused, unread: a member decompressed larger than
    `member_bytes` (a zip or tar bomb is read whole into memory), more than `members` members
    (each listed one costs memory), or more than `total_bytes` decompressed in all. `key`: the
    params key the messages tell the user to raise."""

    member_bytes: int = 256 * MIB
    members: int = 1_000_000
    total_bytes: int = 64 * 1024 * MIB
    key: str = "archive_limits"


DEFAULT_LIMITS = Limits()


class Tally:
    """Members and decompressed bytes counted against `Limits` while an archive is listed."""

    def __init__(self, where: str, limits: Limits) -> None:
        self.where, self.limits, self.members, self.total = where, limits, 0, 0

    def add(self, name: str, size: int) -> None:
        lim = self.limits
        self.members += 1
        self.total += size
        if size > lim.member_bytes:
            raise DataError(f"{self.where}: member {quoted(name)} decompresses to {size:,} bytes, more than the "
                            f"{lim.member_bytes // MIB} MiB {lim.key}.max_member_mib allows; raise it only for "
                            "an archive you trust")
        if self.members > lim.members:
            raise DataError(f"{self.where}: more than {lim.members:,} members, the most {lim.key}.max_members "
                            "allows; raise it only for an archive you trust")
        if self.total > lim.total_bytes:
            raise DataError(f"{self.where}: its members decompress to more than {lim.total_bytes // MIB:,} MiB, "
                            f"the most {lim.key}.max_total_mib allows; raise it only for an archive you trust")


def zip_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member cannot be read without a password or a method zipfile lacks, or None."""
    if info.flag_bits & 0x1:
        return "encrypted (a password would be needed; store it unencrypted)"
    if info.compress_type not in _ZIP_METHODS:
        return (f"compressed with zip method {info.compress_type}, which cannot be read "
                "(use stored, deflate, bzip2 or lzma)")
    return None


def why(exc: BaseException) -> str:
    """A read error on one line: tarfile lists every compression it tried, one per line."""
    return " ".join(str(exc).split())


def read_bounded(fh: IO[bytes], limit: int, where: str, name: str, key: str) -> bytes:
    """A member's bytes, refused once more than `limit` come out: a zip's stated size is only
    what its directory claims."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{where}: member {quoted(name)} decompresses to more than the {limit // MIB} MiB "
                        f"{key}.max_member_mib allows; raise it only for an archive you trust")
    return data

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


def read_members(archive: Path, names: Iterable[str], limits: Limits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """The bytes of the regular-file members `names`, read without extracting anything.

    Every member, wanted or not, must pass `_check_members` and `limits`; a wanted name that is
    missing is a DataError naming it.
    """
    wanted = list(names)
    tally = Tally(archive.name, limits)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            while (member := tar.next()) is not None:  # counted as listed: a huge listing stops early
                tally.add(member.name, member.size if member.isfile() else 0)
                members.append(member)
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
                    out[name] = read_bounded(fh, limits.member_bytes, archive.name, name, limits.key)
    except READ_ERRORS as exc:
        raise DataError(f"{archive.name}: not a readable tar archive ({why(exc)})") from None
    return out
