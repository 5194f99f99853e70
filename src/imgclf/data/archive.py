"""Safe extraction of downloaded tar archives (such as CIFAR-10's binary distribution).

An archive from a mirror is untrusted input: a member named `../x` or `/etc/x`, or a link
pointing elsewhere, would write outside the destination. Only regular files and directories
are extracted, through tarfile's `data` filter, which also refuses absolute and escaping paths.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from imgclf.errors import DataError


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract `archive` into `dest`; return the member names. Refuses the whole archive, before
    writing anything, if any member is a link, a device, absolute or outside `dest`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"{archive.name}: refused: member {member.name!r} is not a regular file "
                                    "or directory (links and devices are never extracted)")
                if member.name.startswith(("/", "\\")):
                    # tarfile's data filter would quietly strip the slash; an archive that
                    # asks for an absolute path is not one we want anything from.
                    raise DataError(f"{archive.name}: refused: member {member.name!r} has an absolute path")
                try:
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as exc:
                    raise DataError(f"{archive.name}: refused: member {member.name!r}: {exc}") from None
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive.name}: not a readable tar archive ({exc})") from None
    return [m.name for m in members]
