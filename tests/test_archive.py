"""Archives are untrusted: path traversal, absolute paths and links are refused whole."""

import io
import tarfile

import pytest

from imgclf.data.archive import safe_extract
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


def test_regular_archive_extracts(tmp_path):
    archive = _tar(tmp_path / "ok.tar.gz", [("cifar/data_batch_1.bin", "file", None), ("cifar/test.bin", "file", None)])
    dest = tmp_path / "out"
    dest.mkdir()
    assert safe_extract(archive, dest) == ["cifar/data_batch_1.bin", "cifar/test.bin"]
    assert (dest / "cifar" / "test.bin").read_bytes() == b"payload"


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (("../escaped.bin", "file", None), "outside the destination"),
        (("/tmp/absolute.bin", "file", None), "absolute"),
        (("cifar/link", "symlink", "/etc/passwd"), "not a regular file"),
        (("cifar/hard", "hardlink", "cifar/data.bin"), "not a regular file"),
    ],
)
def test_hostile_member_refuses_the_whole_archive(tmp_path, member, reason):
    archive = _tar(tmp_path / "bad.tar.gz", [("cifar/data.bin", "file", None), member])
    dest = tmp_path / "out" / "inner"
    dest.mkdir(parents=True)
    with pytest.raises(DataError, match=reason) as info:
        safe_extract(archive, dest)
    assert "\n" not in str(info.value)
    # Nothing at all was written, not even the harmless member listed first.
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "out" / "escaped.bin").exists()


def test_corrupt_archive_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="not a readable tar archive"):
        safe_extract(bad, tmp_path)
