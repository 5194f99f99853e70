"""Archives are untrusted: path traversal, absolute paths and links are refused whole."""

import io
import tarfile

import pytest

from imgclf.data.archive import read_members
from imgclf.errors import DataError


def _tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = b"payload"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, target
                tar.addfile(info)
    return path


HOSTILE = [
    (("../escaped.bin", "file", None), "outside the destination"),
    (("/tmp/absolute.bin", "file", None), "absolute"),
    (("cifar/link", "symlink", "/etc/passwd"), "not a regular file"),
    (("cifar/hard", "hardlink", "cifar/data.bin"), "not a regular file"),
]


def test_corrupt_archive_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable tar archive"):
        read_members(bad, ["cifar/data.bin"])


def test_read_members_returns_the_wanted_files_without_writing(tmp_path):
    archive = _tar(tmp_path / "ok.tar.gz", [("cifar/a.bin", "file", None), ("cifar/b.bin", "file", None)])
    assert read_members(archive, ["cifar/b.bin"]) == {"cifar/b.bin": b"payload"}
    assert [p.name for p in tmp_path.iterdir()] == ["ok.tar.gz"]
    with pytest.raises(DataError, match=r"no member 'cifar/c.bin' \(1 of the 2 expected files are missing\)"):
        read_members(archive, ["cifar/a.bin", "cifar/c.bin"])


@pytest.mark.parametrize(("member", "reason"), HOSTILE)
def test_a_hostile_member_refuses_the_whole_archive(tmp_path, member, reason):
    # Even when the hostile member is not one of the files asked for.
    archive = _tar(tmp_path / "bad.tar.gz", [("cifar/data.bin", "file", None), member])
    with pytest.raises(DataError, match=reason) as info:
        read_members(archive, ["cifar/data.bin"])
    assert "\n" not in str(info.value)
