"""Image folders as real users have them: odd files, every image mode, splits that survive data
changes, duplicates, archives. Real image files, written by Pillow, read by the real reader."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import make_project, serve_directory
from imgclf import config
from imgclf.data import folder
from imgclf.data.images import ImageError, decode
from imgclf.errors import ConfigError, DataError

SHAPE = (1, 8, 8)


def plan(**overrides) -> folder.ReadPlan:
    base = dict(shape=SHAPE, resize="pad", val_fraction=0.2, test_fraction=0.2, test_fraction_given=False,
                seed=42, skip_bad=False, workers=1)
    return folder.ReadPlan(**{**base, **overrides})


def png(path: Path, value: int, size=(8, 8), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def make_classes(root: Path, per_class: int = 30, classes=("cat", "dog"), seed: int = 0) -> None:
    """Distinct images (no accidental duplicates), class k brighter than class k-1."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 100, size=(8, 8), dtype=np.uint8) + np.uint8(100 * k)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(root / name / f"{i:03d}.png")


def read(root: Path, **overrides) -> folder.FolderData:
    return folder.read_tree(folder.scan_folder(root), plan(**overrides))


def manifest(data: folder.FolderData) -> dict[str, tuple[str, str, str]]:
    rows = list(csv.reader(io.StringIO(data.manifest)))[1:]
    return {r[0]: (r[1], r[2], r[4]) for r in rows}


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A PNG whose header claims side x side pixels (over Pillow's safety limit), with no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


# --- what is read, and what is ignored ---------------------------------------------------------

def test_class_names_come_from_folders_and_clutter_is_ignored(tmp_path):
    make_classes(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "cat" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "cat" / "._000.png").write_bytes(b"\0\5\26\7AppleDouble")
    png(tmp_path / "__MACOSX" / "cat" / "._x.png", 1)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: x\n")
    data = read(tmp_path)
    assert data.classes == ["cat", "dog"]
    assert sum(len(s.labels) for s in data.splits.values()) == 60
    assert data.skipped == [] and data.duplicates == 0
    assert all(s.images.shape[1:] == SHAPE and s.images.dtype == np.uint8 for s in data.splits.values())


def test_images_in_nested_subfolders_belong_to_their_top_class_folder(tmp_path):
    make_classes(tmp_path)
    png(tmp_path / "cat" / "2024" / "week1" / "new.png", 250)
    rows = manifest(read(tmp_path))
    assert rows["cat/2024/week1/new.png"][0] == "cat"


def test_train_and_test_folders_make_the_test_set_exactly_test(tmp_path):
    make_classes(tmp_path / "train")
    make_classes(tmp_path / "test", per_class=4, seed=1)
    data = read(tmp_path)
    rows = manifest(data)
    assert {p for p, (_, split, _) in rows.items() if split == "test"} == {
        p for p in rows if p.startswith("test/")}
    assert data.fixed_test and len(data.splits["test"].labels) == 8
    assert {split for p, (_, split, _) in rows.items() if p.startswith("train/")} == {"train", "val"}


def test_a_split_layout_needs_both_folders_and_no_test_fraction(tmp_path):
    make_classes(tmp_path / "train")
    with pytest.raises(DataError, match=r"has a top-level train/ but no test/"):
        read(tmp_path)
    make_classes(tmp_path / "test", per_class=4, seed=1)
    with pytest.raises(DataError, match=r"its test set is test/; remove test_fraction"):
        read(tmp_path, test_fraction_given=True)


# --- bad data: one line naming the file and the rule, or skipped and listed --------------------

def _bad_cases(root: Path) -> dict[str, str]:
    """Bad files a real folder picks up, with the reason each must be reported under."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64), dtype=np.uint8), "L").save(good, "PNG")
    (root / "cat" / "truncated.png").write_bytes(good.getvalue()[:2000])  # cut inside the pixel data
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "notes.jpg").write_text("not an image at all\n")
    bomb_png(root / "dog" / "bomb.png")
    outside = root.parent / "elsewhere.png"
    png(outside, 7)
    (root / "dog" / "link.png").symlink_to(outside)
    png(root / "stray.png", 3)
    return {
        "cat/truncated.png": "damaged or truncated image",
        "cat/empty.png": "empty file",
        "dog/notes.jpg": "not an image",
        "dog/bomb.png": "too many pixels to decode safely",
        "dog/link.png": "a symlink pointing outside the folder",
        "stray.png": "outside any class folder",
    }


def test_bad_files_stop_preprocessing_in_one_line_naming_them(tmp_path):
    root = tmp_path / "photos"
    make_classes(root)
    cases = _bad_cases(root)
    with pytest.raises(DataError) as info:
        read(root)
    message = str(info.value)
    assert message.splitlines() == [message]
    assert f"{len(cases)} bad file(s): " in message and "set bad_files: skip" in message
    # The first three by path, each with its reason.
    for path in sorted(cases)[:3]:
        assert f"{path}: {cases[path]}" in message


def test_skip_leaves_bad_files_out_and_lists_each_with_its_reason(tmp_path):
    root = tmp_path / "photos"
    make_classes(root)
    cases = _bad_cases(root)
    data = read(root, skip_bad=True)
    assert {s["path"]: s["reason"].split(" (")[0] for s in data.skipped} == cases
    assert sum(len(s.labels) for s in data.splits.values()) == 60
    rows = manifest(data)
    assert all(rows[p][2].startswith("skipped: ") for p in cases)


def test_the_same_image_under_two_classes_is_a_bad_file(tmp_path):
    make_classes(tmp_path)
    (tmp_path / "dog" / "copy.png").write_bytes((tmp_path / "cat" / "000.png").read_bytes())
    with pytest.raises(DataError, match=r"the same image is filed under classes cat, dog"):
        read(tmp_path)


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: root.mkdir(), r"found 0 class folder\(s\) with usable images"),
    (lambda root: make_classes(root, classes=("only",)), r"found 1 class folder\(s\)"),
    (lambda root: make_classes(root, per_class=2), "has too few images to split"),
])
def test_folders_that_cannot_make_a_classifier_are_refused(tmp_path, setup, message):
    root = tmp_path / "photos"
    setup(root)
    with pytest.raises(DataError, match=message):
        read(root)


def test_a_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"no such folder \(track it with `dvc add`"):
        folder.scan_folder(tmp_path / "absent")


# --- splits that survive data changes ----------------------------------------------------------

def test_adding_removing_and_relabelling_images_moves_no_other_image(tmp_path):
    make_classes(tmp_path, per_class=40)
    before = manifest(read(tmp_path))
    for i in range(10):
        png(tmp_path / "dog" / f"new{i}.png", 200 + i, size=(9, 9))
    (tmp_path / "cat" / "000.png").unlink()
    (tmp_path / "cat" / "001.png").rename(tmp_path / "dog" / "001-was-cat.png")
    after = manifest(read(tmp_path))
    kept = set(before) & set(after)
    assert len(kept) == 78
    assert all(after[p][1] == before[p][1] for p in kept)
    assert after["dog/001-was-cat.png"] == ("dog", before["cat/001.png"][1], "")


def test_exact_duplicates_land_in_one_split_and_are_used_once(tmp_path):
    make_classes(tmp_path)
    for i in range(5):
        (tmp_path / "cat" / f"dup{i}.png").write_bytes((tmp_path / "cat" / f"{i:03d}.png").read_bytes())
    data = read(tmp_path)
    rows = manifest(data)
    assert data.duplicates == 5
    for i in range(5):
        assert rows[f"cat/dup{i}.png"][1] == rows[f"cat/{i:03d}.png"][1]
        assert rows[f"cat/dup{i}.png"][2] == f"duplicate of cat/{i:03d}.png"
    assert sum(len(s.labels) for s in data.splits.values()) == 60


def test_a_training_copy_of_a_test_image_is_never_trained_on(tmp_path):
    make_classes(tmp_path / "train")
    make_classes(tmp_path / "test", per_class=4, seed=1)
    (tmp_path / "train" / "cat" / "leak.png").write_bytes((tmp_path / "test" / "cat" / "000.png").read_bytes())
    rows = manifest(read(tmp_path))
    assert rows["train/cat/leak.png"] == ("cat", "test", "duplicate of test/cat/000.png")


def test_output_does_not_depend_on_the_number_of_workers(tmp_path):
    make_classes(tmp_path, per_class=80)
    one, two = read(tmp_path, workers=1), read(tmp_path, workers=2)
    assert one.manifest == two.manifest
    for name in ("train", "val", "test"):
        assert one.splits[name].images.tobytes() == two.splits[name].images.tobytes()
        assert one.splits[name].labels.tolist() == two.splits[name].labels.tolist()


# --- every mode, converted and resized by the documented policy --------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA"])
def test_every_mode_becomes_the_configured_channels_and_size(tmp_path, mode):
    img = Image.new(mode, (13, 7))
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    buf = io.BytesIO()
    img.save(buf, fmt)
    for channels in (1, 3):
        out = decode(buf.getvalue(), (channels, 10, 12), resize="pad")
        assert out.shape == (channels, 10, 12) and out.dtype == np.uint8


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((4, 8), dtype=np.uint8)
    pixels[:, :4] = 255  # left half white, as stored
    img = Image.fromarray(pixels, "L")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=100)
    out = decode(buf.getvalue(), (1, 8, 4), resize="stretch")[0]
    assert out[:4].mean() > 200 and out[4:].mean() < 50  # upright: the white half is now on top


def test_resize_policies(tmp_path):
    wide = Image.new("L", (20, 10), 255)  # a white 2:1 image into a square
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    pad = decode(buf.getvalue(), (1, 10, 10), resize="pad")[0]
    assert pad[0].max() == 0 and pad[-1].max() == 0 and pad[5].min() == 255  # black bars above and below
    assert decode(buf.getvalue(), (1, 10, 10), resize="crop")[0].min() == 255  # the centre, no bars
    assert decode(buf.getvalue(), (1, 10, 10), resize="stretch")[0].min() == 255


def test_a_bomb_is_refused_before_decoding(tmp_path):
    with pytest.raises(ImageError, match="too many pixels"):
        decode(bomb_png(tmp_path / "b.png").read_bytes(), SHAPE)


# --- archives ---------------------------------------------------------------------------------

def _members(per_class: int = 30) -> dict[str, bytes]:
    out = {}
    for k, name in enumerate(("cat", "dog")):
        for i in range(per_class):
            buf = io.BytesIO()
            # Noise, not a flat colour: preprocess refuses a folder of (nearly) uniform images.
            pixels = np.random.default_rng(k * 1000 + i).integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(buf, "PNG")
            out[f"photos/{name}/{i:03d}.png"] = buf.getvalue()
    return out


def test_tar_and_zip_archives_read_like_the_folder_without_extracting(tmp_path):
    members = _members()
    tar_path, zip_path = tmp_path / "p.tar.gz", tmp_path / "p.zip"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("__MACOSX/photos/._cat", b"junk")
    from_tar = folder.read_tree(folder.scan_archive(tar_path), plan())
    from_zip = folder.read_tree(folder.scan_archive(zip_path), plan())
    assert from_tar.classes == from_zip.classes == ["cat", "dog"]  # the wrapper folder is not a class
    assert from_tar.manifest == from_zip.manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tar.gz", "p.zip"]  # nothing extracted


def test_archive_members_that_escape_or_link_are_bad_files(tmp_path):
    members = _members()
    path = tmp_path / "p.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in {**members, "photos/cat/../../../evil.png": members["photos/cat/000.png"]}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("photos/dog/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DataError) as info:
        folder.read_tree(folder.scan_archive(path), plan())
    assert "a member path outside the archive" in str(info.value)
    assert "a link or special member (never followed)" in str(info.value)
    assert not (tmp_path.parent / "evil.png").exists()


# --- the params entry -------------------------------------------------------------------------

def _entry(**keys):
    params = config.read_params()
    params["datasets"]["mine"] = {"folder": "data/images/mine", "image_size": [32, 32], "channels": 3, **keys}
    return params


@pytest.mark.parametrize(("keys", "message"), [
    ({"folder": "/tmp/mine"}, "datasets.mine.folder: got '/tmp/mine': must be a folder below data/images/"),
    ({"folder": "data/images/../../etc"}, "must be a folder below data/images/"),
    ({"channels": 4}, "datasets.mine.channels: got 4"),
    ({"image_size": [32]}, "datasets.mine.image_size: got [32]"),
    ({"classes": ["a", "b"]}, "classes: not allowed for an image folder"),
    ({"resize": "squash"}, "datasets.mine.resize: got 'squash'"),
    ({"bad_files": "ignore"}, "datasets.mine.bad_files: got 'ignore'"),
    ({"mirrors": ["https://example.org/"], "files": {"p.zip": "0" * 64}}, "give either folder"),
])
def test_bad_folder_entries_fail_in_one_line(keys, message):
    with pytest.raises(ConfigError) as info:
        config.load_dataset("mine", _entry(**keys))
    assert message in str(info.value) and str(info.value).splitlines() == [str(info.value)]


def test_an_archive_entry_names_exactly_one_tar_or_zip():
    params = _entry(folder=None)
    del params["datasets"]["mine"]["folder"]
    params["datasets"]["mine"].update(mirrors=["https://example.org/"], files={"p.rar": "0" * 64})
    with pytest.raises(ConfigError, match=r"'p.rar' is not a .tar, .tar.gz, .tgz or .zip archive"):
        config.load_dataset("mine", params)
    params["datasets"]["mine"]["files"] = {"p.tar.gz": "0" * 64}
    assert config.load_dataset("mine", params).files == {"p.tar.gz": "0" * 64}


@pytest.mark.slow
def test_an_archive_at_a_url_is_fetched_verified_and_read_by_the_stages(tmp_path):
    """The user's third way in: `mirrors` + `files` naming a .tar.gz and its SHA-256; the real
    download and preprocess stages, against a loopback server."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = mirror / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in _members().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    checksum = hashlib.sha256(gzip.decompress(archive.read_bytes())).hexdigest()  # of the content, as for .gz files
    with serve_directory(mirror) as url:
        def choose(params):
            params["download"].update(dataset="photos", retries=0)
            params["datasets"]["photos"] = {"mirrors": [url], "files": {"photos.tar.gz": checksum},
                                            # 16: the 4-block cnn halves it to 1 (validate checks)
                                            "image_size": [16, 16], "channels": 1}
        (tmp_path / "base").mkdir()
        project = make_project(tmp_path / "base", choose)
        for stage in ("validate", "download", "preprocess"):
            proc = project.run("python", f"stages/{stage}.py", check=False)
            assert proc.returncode == 0, proc.stderr
    processed = project.path / "data" / "processed"
    meta = json.loads((processed / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["source"]["kind"] == "archive"
    assert meta["version"]["checksum"] == checksum
    assert sum(meta["counts"].values()) == 60
    assert (processed / "manifest.csv").read_text().startswith("path,class,split,sha256,note\n")
    assert sorted(p.name for p in (project.path / "data" / "raw").iterdir()) == ["photos.tar"]


def test_the_sample_tool_writes_official_images_into_class_folders(tmp_path):
    """`python -m imgclf.data.sample`, README's way to a first image folder: the first N training
    and N/5 test images of each class (every image with --all), the raw files' pixels in PNG
    files named by their position, and an existing folder refused rather than overwritten."""
    from fixtures import tiny_project
    from imgclf.data.raw import load_raw

    with tiny_project(tmp_path) as project:  # 30 training and 10 test images per class
        project.run("python", "-m", "imgclf.data.sample", "--all", "--out", "data/images/every")
        project.run("python", "-m", "imgclf.data.sample", "--per-class", "6")
        again = project.run("python", "-m", "imgclf.data.sample", "--per-class", "6", check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == \
        "error: data/images/fashion_png already exists: remove it first (or choose --out)", again.stderr
    raw = tmp_path / "raw"
    raw.mkdir()
    for gz in (tmp_path / "mirror").glob("*.gz"):
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    classes = config.load_dataset("fashion_mnist", config.read_params(project.path / "params.yaml")).classes
    official = dict(zip(("train", "test"), load_raw(raw, "idx", tuple(classes))))
    for out, per_class in (("every", None), ("fashion_png", 6)):
        for split, data in official.items():
            n = None if per_class is None else per_class if split == "train" else per_class // 5
            for label, name in enumerate(classes):
                expected = np.flatnonzero(data.labels == label)[:n]
                files = sorted((project.path / "data/images" / out / split / name.replace("/", "_")).iterdir())
                assert [f.name for f in files] == [f"{i:05d}.png" for i in expected], (out, split, name)
                for f, i in zip(files, expected):
                    assert np.array_equal(np.asarray(Image.open(f)), data.images[i, 0]), f
