"""Archives within limits: a member too big (a bomb), too many members or too many bytes in
all are refused unread, in one line naming the params key to raise; encrypted or unsupported
zip members are bad files; a corrupt .tar.xz is one line, not a traceback."""

from __future__ import annotations

import io
import lzma
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.config import ConfigError, DatasetConfig, PreprocessConfig, load_dataset
from imgclf.data import cifar, folder
from imgclf.data.archive import MIB, Limits, read_members
from imgclf.data.prepare import write_processed
from imgclf.errors import DataError

PLAN = folder.ReadPlan(shape=(1, 8, 8), resize="stretch", val_fraction=0.2, test_fraction=0.2,
                       test_fraction_given=False, seed=0, skip_bad=False, workers=1)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def _images(per_class: int = 20) -> dict[str, bytes]:
    return {f"photos/{c}/{i}.png": _png(k * 1000 + i) for k, c in enumerate(("cat", "dog")) for i in range(per_class)}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message.splitlines() == [message]
    return message


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_bomb_member_is_refused_unread_naming_the_key(tmp_path, kind):
    members = {**_images(), "photos/cat/bomb.png": bytes(3 * MIB)}  # zeros: compresses ~1000:1
    archive = (_zip if kind == "zip" else lambda p, m: _tar(p, m, "w:gz"))(tmp_path / f"a.{kind}", members)
    assert archive.stat().st_size < MIB  # small on disk, as a bomb is
    limits = Limits(member_bytes=2 * MIB, key="datasets.pets.archive_limits")
    with pytest.raises(DataError) as info:
        folder.scan_archive(archive, limits)
    assert _one_line(info) == (
        f"a.{kind}: member 'photos/cat/bomb.png' decompresses to 3,145,728 bytes, more than the 2 MiB "
        "datasets.pets.archive_limits.max_member_mib allows; raise it only for an archive you trust")


def test_too_many_members_or_bytes_are_refused(tmp_path):
    archive = _tar(tmp_path / "a.tar", _images())
    with pytest.raises(DataError) as info:
        folder.scan_archive(archive, Limits(members=10))
    assert _one_line(info) == ("a.tar: more than 10 members, the most archive_limits.max_members allows; "
                               "raise it only for an archive you trust")
    big = _tar(tmp_path / "b.tar", {f"photos/cat/{i}.bin": bytes(MIB) for i in range(3)})
    with pytest.raises(DataError, match=r"decompress to more than 2 MiB, the most archive_limits.max_total_mib"):
        folder.scan_archive(big, Limits(total_bytes=2 * MIB))
    with pytest.raises(DataError, match="max_total_mib"):
        read_members(big, ["photos/cat/0.bin"], Limits(total_bytes=2 * MIB))


def test_a_member_bigger_than_its_zip_directory_claims_is_cut_off(tmp_path):
    """A zip's sizes are what its directory claims: the read itself is bounded too."""
    archive = _zip(tmp_path / "a.zip", {**_images(), "photos/cat/liar.png": bytes(3 * MIB)})
    tree = folder.scan_archive(archive)  # listed within the default limits
    tree.limits = Limits(member_bytes=2 * MIB)  # as if the directory had claimed less
    with pytest.raises(DataError, match=r"a.zip: member 'cat/liar.png' decompresses to more than the 2 MiB archive_limits.max_member_mib"):
        folder.read_tree(tree, PLAN)


def _patch_zip(path: Path, member: str, *, flags: int | None = None, method: int | None = None) -> None:
    """Rewrite one member's general-purpose flags or method in its local and central headers."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    for signature, flag_at, name_at in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        pos = 0
        while (pos := data.find(signature, pos)) != -1:
            if data[pos + name_at : pos + name_at + len(name)] == name:
                if flags is not None:
                    data[pos + flag_at : pos + flag_at + 2] = flags.to_bytes(2, "little")
                if method is not None:
                    data[pos + flag_at + 2 : pos + flag_at + 4] = method.to_bytes(2, "little")
            pos += 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, reason", [
    ("encrypted", "encrypted (a password would be needed; store it unencrypted)"),
    ("deflate64", "compressed with zip method 9, which cannot be read (use stored, deflate, bzip2 or lzma)"),
])
def test_encrypted_or_unsupported_zip_members_are_bad_files_in_one_line(tmp_path, case, reason):
    archive = _zip(tmp_path / "a.zip", {**_images(), "photos/cat/odd.png": _png(7)})
    _patch_zip(archive, "photos/cat/odd.png", **({"flags": 1} if case == "encrypted" else {"method": 9}))
    with pytest.raises(DataError) as info:
        folder.read_tree(folder.scan_archive(archive), PLAN)
    assert f"a.zip: 1 bad file(s): cat/odd.png: {reason}; fix or remove" in _one_line(info)


def _corrupt(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_tar_xz_is_one_line(tmp_path):
    archive = _corrupt(_tar(tmp_path / "a.tar.xz", _images(40), "w:xz"))
    with pytest.raises(lzma.LZMAError):  # what tarfile lets through on its own
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    tar.extractfile(member).read()
    with pytest.raises(DataError) as info:
        folder.read_tree(folder.scan_archive(archive), PLAN)
    assert _one_line(info).startswith("a.tar.xz: not a readable tar or zip archive (")


def test_a_corrupt_cifar_tar_xz_is_one_line(tmp_path):
    archive = _corrupt(_tar(tmp_path / cifar.ARCHIVE, {f"{cifar.FOLDER}/x": bytes(range(256)) * 4000}, "w:xz"))
    with pytest.raises(DataError) as info:
        read_members(archive, [f"{cifar.FOLDER}/x"])
    assert _one_line(info).startswith(f"{cifar.ARCHIVE}: not a readable tar archive (")


def test_limits_are_validated_params_with_defaults_and_reach_the_stage(tmp_path):
    entry = {"mirrors": ["https://example.org/"], "files": {"pets.zip": "0" * 64}, "image_size": [8, 8],
             "channels": 1}
    assert load_dataset("pets", {"datasets": {"pets": entry}}).archive_limits.max_member_mib == 256
    with pytest.raises(ConfigError, match=r"datasets.pets.archive_limits.max_members: got 0: "):
        load_dataset("pets", {"datasets": {"pets": {**entry, "archive_limits": {"max_members": 0}}}})
    raw = tmp_path / "raw"
    raw.mkdir()
    _zip(raw / "pets.zip", {**_images(), "photos/cat/bomb.png": bytes(3 * MIB)})
    ds = DatasetConfig(**{**entry, "archive_limits": {"max_member_mib": 2}})
    with pytest.raises(DataError, match=r"more than the 2 MiB datasets.pets.archive_limits.max_member_mib allows"):
        write_processed(tmp_path / "out", "pets", ds, PreprocessConfig(val_fraction=0.2, seed=0), raw, tmp_path,
                        workers=1)
