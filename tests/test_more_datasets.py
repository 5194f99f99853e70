"""MNIST and CIFAR-10 next to Fashion-MNIST: one param picks the data set, archive (md5:)
checksums verify what mirrors serve, CIFAR-10's binary tarball is read record by record
through the archive refusal rules, and the pipeline runs end to end on RGB 32x32 images.

Every data set here is a tiny real-format copy made by the test and served on loopback.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from fixtures import FASHION_FILES, TINY, make_fashion_like, make_project, serve_directory, set_params
from imgclf import config
from imgclf.data import cifar
from imgclf.data.dataset import channel_stats
from imgclf.data.download import fetch_one
from imgclf.data.raw import load_raw
from imgclf.errors import ConfigError, DataError, DownloadError

CIFAR_GZ = "cifar-10-binary.tar.gz"


def _md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def make_mnist_like(directory: Path, **kwargs) -> dict[str, str]:
    """Tiny MNIST-format .gz IDX files; return {file: md5 of the .gz as served}."""
    make_fashion_like(directory, **kwargs)
    return {name: _md5((directory / name).read_bytes()) for name in FASHION_FILES.values()}


def cifar_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colourful, learnable (N, 3, 32, 32) images: class k lights rows 3k..3k+3 in colour k % 3."""
    images = rng.integers(0, 60, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for i, k in enumerate(labels):
        images[i, k % 3, 3 * k + 1 : 3 * k + 4, 4:28] = rng.integers(200, 256, dtype=np.uint8)
    return images


def cifar_tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A gzip tarball of `members` (name -> bytes) plus raw extra TarInfo entries, byte-stable."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return gzip.compress(buffer.getvalue(), mtime=0)


def cifar_members(train_per_class: int = 20, test_per_class: int = 10, seed: int = 0,
                  ) -> tuple[dict[str, bytes], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The members of a tiny cifar-10-binary.tar.gz, and the (images, labels) they hold."""
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), train_per_class))
    test_labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), test_per_class))
    train, test = cifar_images(train_labels, rng), cifar_images(test_labels, rng)
    folder = cifar.FOLDER
    # Five training batches as in the real archive, of uneven sizes to show they are concatenated.
    cuts = np.array_split(np.arange(len(train_labels)), 5)
    members = {f"{folder}/data_batch_{i + 1}.bin": cifar.encode(train[c], train_labels[c]) for i, c in enumerate(cuts)}
    members[f"{folder}/test_batch.bin"] = cifar.encode(test, test_labels)
    members[f"{folder}/batches.meta.txt"] = ("\n".join(_classes("cifar10")) + "\n\n").encode()
    return members, (train, train_labels), (test, test_labels)


def make_cifar_like(directory: Path, **kwargs) -> dict[str, str]:
    """A tiny cifar-10-binary.tar.gz in directory; return {file: md5 of it as served}."""
    directory.mkdir(parents=True, exist_ok=True)
    data = cifar_tar(cifar_members(**kwargs)[0])
    (directory / CIFAR_GZ).write_bytes(data)
    return {CIFAR_GZ: _md5(data)}


def _raw_dir(tmp_path: Path, tar_gz: bytes) -> Path:
    """data/raw as the download stage leaves it: the tarball stored decompressed."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / cifar.ARCHIVE).write_bytes(gzip.decompress(tar_gz))
    return raw


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- one param picks the data set ----------------------------------------------------------

def _classes(name: str) -> list[str]:
    return list(config.load_dataset(name, config.read_params()).classes)


def test_every_built_in_data_set_is_described_in_params_with_classes_augmentation_and_title():
    params = config.read_params()
    built_in = {n for n in params["datasets"] if config.load_dataset(n, params).format != "folder"}
    assert built_in == {"fashion_mnist", "mnist", "cifar10"}
    assert _classes("mnist") == list("0123456789")
    mnist, cifar = config.load_dataset("mnist", params), config.load_dataset("cifar10", params)
    assert (mnist.augment.shift, mnist.augment.flip) == (2, False)
    assert (cifar.augment.shift, cifar.augment.flip) == (4, True)
    assert all(config.load_dataset(n, params).title for n in built_in)


# --- md5: checksums are of the file as served ----------------------------------------------

def test_md5_checksum_accepts_the_served_file_and_refuses_any_other(tmp_path):
    mirror, other = tmp_path / "mirror", tmp_path / "other"
    checksums = make_mnist_like(mirror)
    name = FASHION_FILES["train_labels"]
    # Same content, re-compressed: a content SHA-256 would accept it, an archive MD5 must not.
    other.mkdir()
    (other / name).write_bytes(gzip.compress(gzip.decompress((mirror / name).read_bytes()), mtime=1))
    target = tmp_path / "raw" / "labels"
    with serve_directory(other) as other_url, serve_directory(mirror) as url:
        used = fetch_one(name, checksums[name], [other_url, url], target, timeout_s=5, retries=0)
        assert used == url
        # Stored decompressed, as with SHA-256 checksums.
        assert target.read_bytes() == gzip.decompress((mirror / name).read_bytes())

        wrong = "md5:" + "0" * 32
        target.unlink()
        with pytest.raises(DownloadError) as info:
            fetch_one(name, wrong, [url], target, timeout_s=5, retries=2)
        # A malformed checksum is refused before anything is fetched.
        with pytest.raises(ConfigError, match=r"md5:<32 lowercase hex digits>"):
            fetch_one(name, "md5:" + "0" * 31, [url], target, timeout_s=5, retries=0)
    served = checksums[name].removeprefix("md5:")
    assert str(info.value) == (f"could not fetch a verified {name} from any mirror: {url}{name}: checksum mismatch: "
                               f"MD5 of the file as served is {served}, expected {'0' * 32}")
    assert _tree(tmp_path / "raw") == []  # nothing unverified, no temporary file


# --- the CIFAR-10 binary reader -------------------------------------------------------------

def test_cifar_records_read_back_as_channel_first_rgb(tmp_path):
    members, (train, train_labels), (test, test_labels) = cifar_members(train_per_class=3, test_per_class=2)
    # One record by hand: label, then the red plane, the green plane, the blue plane, row-major.
    first = members[f"{cifar.FOLDER}/data_batch_1.bin"][: cifar.RECORD]
    assert first[0] == train_labels[0]
    assert first[1:1025] == train[0, 0].tobytes() and first[2049:] == train[0, 2].tobytes()
    got_train, got_test = load_raw(_raw_dir(tmp_path, cifar_tar(members)), "cifar", tuple(_classes("cifar10")))
    assert got_train.images.dtype == np.uint8 and got_train.images.shape == (30, 3, 32, 32)
    assert got_train.labels.dtype == np.int64
    assert np.array_equal(got_train.images, train) and np.array_equal(got_train.labels, train_labels)
    assert np.array_equal(got_test.images, test) and np.array_equal(got_test.labels, test_labels)


def _escaping(members: dict[str, bytes]) -> list[tarfile.TarInfo]:
    info = tarfile.TarInfo("cifar-10-batches-bin/../../escaped.bin")
    info.size = 4
    return [info]


def _symlink(members: dict[str, bytes]) -> list[tarfile.TarInfo]:
    info = tarfile.TarInfo("cifar-10-batches-bin/readme.html")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return [info]


def _short_record(members: dict[str, bytes]) -> None:
    members["cifar-10-batches-bin/data_batch_3.bin"] += b"\x01" * 5


def _label_out_of_range(members: dict[str, bytes]) -> None:
    data = bytearray(members["cifar-10-batches-bin/test_batch.bin"])
    data[cifar.RECORD] = 10  # the second record's label byte
    members["cifar-10-batches-bin/test_batch.bin"] = bytes(data)


def _missing_batch(members: dict[str, bytes]) -> None:
    del members["cifar-10-batches-bin/data_batch_5.bin"]


def _other_classes(members: dict[str, bytes]) -> None:
    members["cifar-10-batches-bin/batches.meta.txt"] = b"apple\naquarium_fish\nbaby\nbear\nbeaver\nbed\nbee\nbeetle\nbicycle\nbottle\n"


@pytest.mark.parametrize(("damage", "message"), [
    (_escaping, "cifar-10-binary.tar: refused: member 'cifar-10-batches-bin/../../escaped.bin': "),
    (_symlink, "cifar-10-binary.tar: refused: member 'cifar-10-batches-bin/readme.html' is not a regular file"),
    (_short_record, "cifar-10-binary.tar:data_batch_3.bin: 18443 bytes is not a whole, non-zero number of "
                    "3073-byte records"),
    (_label_out_of_range, "cifar-10-binary.tar:test_batch.bin: 1 labels outside 0..9"),
    (_missing_batch, "cifar-10-binary.tar: no member 'cifar-10-batches-bin/data_batch_5.bin'"),
    (_other_classes, "cifar-10-binary.tar: batches.meta.txt lists classes ['apple', "),
])
def test_damaged_or_hostile_cifar_archive_is_refused_in_one_line_writing_nothing(tmp_path, damage, message):
    members = cifar_members(train_per_class=3, test_per_class=1)[0]
    extra = damage(members)
    raw = _raw_dir(tmp_path, cifar_tar(members, extra))
    before = _tree(tmp_path)
    with pytest.raises(DataError) as info:
        load_raw(raw, "cifar", tuple(_classes("cifar10")))
    assert str(info.value).startswith(message), str(info.value)
    assert str(info.value).splitlines() == [str(info.value)]
    assert _tree(tmp_path) == before  # nothing extracted anywhere, not even the good members
    assert not (tmp_path / "escaped.bin").exists()


# --- the download and preprocess stages on each new data set ---------------------------------

def _stage(project, name: str):
    return project.run("python", f"stages/{name}.py", check=False)


@pytest.mark.parametrize(("dataset", "make", "shape", "augment"), [
    ("mnist", make_mnist_like, [1, 28, 28], {"shift": 2, "flip": False}),
    ("cifar10", make_cifar_like, [3, 32, 32], {"shift": 4, "flip": True}),
])
def test_download_and_preprocess_stages_on_each_data_set(tmp_path, dataset, make, shape, augment):
    checksums = make(tmp_path / "mirror")
    with serve_directory(tmp_path / "mirror") as url:
        def choose(params):
            params["download"].update(dataset=dataset, retries=0)
            params["datasets"][dataset].update(mirrors=[url], files=checksums)

        (tmp_path / "base").mkdir()
        project = make_project(tmp_path / "base", choose)
        for stage in ("validate", "download", "preprocess"):
            proc = _stage(project, stage)
            assert proc.returncode == 0, proc.stderr
    data = project.path / "data"
    # .gz files are stored decompressed, CIFAR's tarball included.
    assert sorted(p.name for p in (data / "raw").iterdir()) == sorted(n.removesuffix(".gz") for n in checksums)
    meta = json.loads((data / "processed" / "meta.json").read_text())
    assert meta["dataset"] == dataset and meta["classes"] == _classes(dataset)
    assert meta["shape"] == shape and meta["augment"] == augment
    total_train = 300 if dataset == "mnist" else 200
    assert sum(meta["counts"][s] for s in ("train", "val")) == total_train and meta["counts"]["val"] == total_train // 10
    train = np.load(data / "processed" / "train_images.npy")
    assert train.dtype == np.uint8 and list(train.shape[1:]) == shape and len(train) == meta["counts"]["train"]
    # One mean and std per channel, from the training split alone.
    assert (meta["mean"], meta["std"]) == channel_stats(train) and len(meta["mean"]) == shape[0]
    if dataset == "cifar10":
        assert len(set(meta["mean"])) == 3  # the channels differ, so per-channel stats differ

        # A hostile archive in data/raw: preprocess stops in one line and writes nothing.
        (data / "raw" / cifar.ARCHIVE).write_bytes(gzip.decompress(cifar_tar(*_hostile())))
        (data / "processed").rename(data / "previous")
        proc = _stage(project, "preprocess")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: cifar-10-binary.tar: refused: member ")
        # data/images is the project's own (git-tracked) folder of image folders.
        assert sorted(p.name for p in data.iterdir()) == ["images", "params-checked", "previous", "raw"]


def _hostile() -> tuple[dict[str, bytes], list[tarfile.TarInfo]]:
    members = cifar_members(train_per_class=1, test_per_class=1)[0]
    return members, _escaping(members)


# --- the whole pipeline on RGB 32x32 ---------------------------------------------------------

@pytest.mark.slow
def test_cifar10_pipeline_end_to_end_and_other_entries_rerun_nothing(tmp_path):
    checksums = make_cifar_like(tmp_path / "mirror")
    with serve_directory(tmp_path / "mirror") as url:
        def tiny_cifar(params):
            params["download"].update(dataset="cifar10", retries=0)
            params["datasets"]["cifar10"].update(mirrors=[url], files=checksums)
            params["train"].update(TINY["train"], epochs=2)
            # The CNN alone: both models' forward passes on 3x32x32 are unit-tested
            # (test_models_engine.py), and each model here costs two stage start-ups.
            params["models"] = {"cnn": TINY["models"]["cnn"]}
            params.update({k: TINY[k] for k in ("evaluate", "report")})

        (tmp_path / "base").mkdir()
        project = make_project(tmp_path / "base", tiny_cifar)
        assert project.repro() == {"validate", "download", "preprocess", "train@cnn", "evaluate@cnn", "report"}
        repo = project.path
        test = json.loads((repo / "metrics/cnn/test.json").read_text())
        assert test["test/images"] == 100 and 0 <= test["test/accuracy"] <= 1
        report = (repo / "reports/report.md").read_text()
        assert report.startswith("# CIFAR-10: cnn") and "3×32×32 pixels" in report
        # The sample grid is drawn in colour: plenty of its pixels are far from gray.
        samples = mpimg.imread(repo / "reports/figures/samples.png")[..., :3]
        colourful = (samples.max(axis=-1) - samples.min(axis=-1)) > 0.3
        assert colourful.mean() > 0.02

        # download depends on datasets.<chosen> only: another entry's edit reruns just the
        # params check (whose output is unchanged, so nothing after it)...
        set_params(repo, lambda p: p["datasets"]["mnist"]["mirrors"].append("https://example.org/mnist/"))
        assert project.repro() == {"validate"}
        # ...while the chosen entry's edit fetches again, and the same bytes rerun nothing else.
        set_params(repo, lambda p: p["datasets"]["cifar10"]["mirrors"].insert(0, (tmp_path / "none").as_uri() + "/"))
        # preprocess reads the chosen entry (its format, classes, augmentation), so it reruns, but
        # the data it makes is the same: nothing after it reruns.
        assert project.repro() == {"validate", "download", "preprocess"}
