"""Cost that grows with the data, not memory (docs/scale.md): preprocessing streams into
memory-mapped files with the same bytes for any number of workers, the processed splits are
mapped (not copied) for training, and a data set larger than the memory a process may use
is preprocessed and read under a real cgroup memory limit with the same results."""

from __future__ import annotations

import importlib.util
import io
import json
import mmap
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import save_processed
from imgclf.config import DatasetConfig, PreprocessConfig
from imgclf.data import idx
from imgclf.data.dataset import SPLITS, Split, channel_stats, load_meta, load_split, stratified_split
from imgclf.data.prepare import write_processed
from imgclf.data.raw import IDX_FILES
from imgclf.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
PRE = PreprocessConfig(val_fraction=0.2, seed=42)
CLASSES = [f"c{k}" for k in range(10)]


def _bench():
    """bench/scale.py, whose cgroup helpers the limited test shares (one home for them)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _idx_entry() -> DatasetConfig:
    return DatasetConfig(format="idx", classes=CLASSES, mirrors=["https://example.org/"],
                         files={f"{name}.gz": "0" * 64 for pair in IDX_FILES.values() for name in pair})


def _write_raw(raw: Path, n_train: int, n_test: int, shape=(12, 12), seed: int = 0) -> None:
    """The four decompressed IDX files of data/raw, random pixels, every class present."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = IDX_FILES[split]
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        with (raw / images_name).open("wb") as fh:  # block by block: the big case is 190 MB
            fh.write(struct.pack(">BBBB3I", 0, 0, 8, 3, n, *shape))  # IDX header: uint8, 3 dimensions
            for first in range(0, n, 10_000):
                fh.write(rng.integers(0, 256, (min(10_000, n - first), *shape), dtype=np.uint8).tobytes())
        (raw / labels_name).write_bytes(idx.encode(labels))


# --- streaming preprocessing: the same bytes ------------------------------------------------------

def test_streamed_idx_output_is_what_the_in_memory_split_saved(tmp_path):
    """The default data set's path: rows gathered from a map of the raw file, block by block,
    give exactly the files np.save wrote of the whole arrays (dvc.lock's data/processed md5)."""
    _write_raw(tmp_path / "raw", 3000, 500)
    out = tmp_path / "out"
    out.mkdir()
    meta = write_processed(out, "tiny", _idx_entry(), PRE, tmp_path / "raw", tmp_path)
    images = idx.read(tmp_path / "raw" / IDX_FILES["train"][0])[:, None]
    labels = idx.read(tmp_path / "raw" / IDX_FILES["train"][1]).astype(np.int64)
    train, val = stratified_split(labels, PRE.val_fraction, PRE.seed)
    expected = {"train": (images[train], labels[train]), "val": (images[val], labels[val])}
    test_images = idx.read(tmp_path / "raw" / IDX_FILES["test"][0])[:, None]
    expected["test"] = (test_images, idx.read(tmp_path / "raw" / IDX_FILES["test"][1]).astype(np.int64))
    for name, (x, y) in expected.items():
        assert (out / f"{name}_images.npy").read_bytes() == _npy_bytes(x)
        assert (out / f"{name}_labels.npy").read_bytes() == _npy_bytes(y)
    # The float64 formula the statistics used to come from, to the 6 decimals kept.
    x = expected["train"][0] / 255.0
    assert meta["mean"] == [round(float(x.mean()), 6)] and meta["std"] == [round(float(x.std()), 6)]
    assert meta["counts"] == {"train": 2400, "val": 600, "test": 500}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_{k}.npy" for s in SPLITS for k in ("images", "labels")] + ["meta.json"])


def _png_folder(root: Path, per_class: int = 40) -> None:
    """Real PNG files of three classes, RGB and gray, odd sizes, one duplicate and one bad file."""
    rng = np.random.default_rng(7)
    for k, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(6, 20)), int(rng.integers(6, 20)))
            pixels = rng.integers(0, 200, (*size[::-1], 3), dtype=np.uint8) + np.uint8(25 * k)
            Image.fromarray(pixels, "RGB").convert("L" if i % 3 else "RGB").save(root / name / f"{i:03d}.png")
    (root / "ant" / "copy.png").write_bytes((root / "ant" / "000.png").read_bytes())
    (root / "bee" / "broken.png").write_bytes((root / "bee" / "001.png").read_bytes()[:40])


def test_folder_output_is_byte_identical_for_one_and_two_workers(tmp_path):
    _png_folder(tmp_path / "data" / "images" / "tiny")
    entry = DatasetConfig(folder="data/images/tiny", image_size=[10, 12], channels=3, bad_files="skip")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        out.mkdir()
        meta = write_processed(out, "tiny", entry, PRE, tmp_path / "raw", tmp_path, workers=workers)
        outputs[workers] = _files(out)
    assert outputs[1] == outputs[2]
    assert ".decoded.npy" not in outputs[1]  # the scratch file is gone
    assert meta["duplicates"] == 1 and [s["path"] for s in meta["skipped"]] == ["bee/broken.png"]
    assert sum(meta["counts"].values()) == 3 * 40  # the copy is not used twice, the broken file left out
    for name in SPLITS:  # the memory-mapped writer's files are the np.save files of their arrays
        for kind in ("images", "labels"):
            array = np.load(tmp_path / "out1" / f"{name}_{kind}.npy")
            assert outputs[1][f"{name}_{kind}.npy"] == _npy_bytes(array)
    train = np.load(tmp_path / "out1" / "train_images.npy")
    assert (meta["mean"], meta["std"]) == channel_stats(train) and len(meta["mean"]) == 3


def test_a_bad_folder_fails_in_one_line_and_leaves_no_scratch_file(tmp_path):
    _png_folder(tmp_path / "data" / "images" / "tiny")
    out = tmp_path / "out"
    out.mkdir()
    entry = DatasetConfig(folder="data/images/tiny", image_size=[10, 12], channels=3)
    with pytest.raises(DataError) as info:
        write_processed(out, "tiny", entry, PRE, tmp_path / "raw", tmp_path, workers=2)
    assert str(info.value).startswith("data/images/tiny: 1 bad file(s): bee/broken.png: not an image")
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


# --- mapped, not copied ------------------------------------------------------------------------

def _mapped(array: np.ndarray) -> bool:
    """Whether the array's memory is a file map (somewhere down its chain of bases)."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


def test_load_split_maps_the_files_copy_on_write_ready_for_torch(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    labels = (np.arange(50) % 2).astype(np.int64)
    save_processed(tmp_path, {"train": Split(images, labels)}, {"classes": ["a", "b"], "shape": [3, 8, 8]})
    on_disk = (tmp_path / "train_images.npy").read_bytes()
    split = load_split(tmp_path, "train", load_meta(tmp_path))
    assert _mapped(split.images) and _mapped(split.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        x = torch.from_numpy(split.images)
    # What the train stage does, `.to(device)` on the CPU: still the map, no copy.
    assert x.to("cpu").data_ptr() == split.images.ctypes.data
    assert torch.equal(x[torch.tensor([3, 1])], torch.from_numpy(images[[3, 1]]))
    x[0] = 0  # copy-on-write: this process's page changes, the file never does
    del x, split
    assert (tmp_path / "train_images.npy").read_bytes() == on_disk
    in_memory = load_split(tmp_path, "train", load_meta(tmp_path), mmap=False)
    assert not _mapped(in_memory.images) and np.array_equal(in_memory.images, images)


# --- larger than the memory limit ----------------------------------------------------------------

_READ_BATCHES = """
import hashlib, sys
from pathlib import Path
import numpy as np
from imgclf.data.dataset import load_meta, load_split
out = Path(sys.argv[1])
split = load_split(out, "train", load_meta(out))
digest = hashlib.sha256()
order = np.random.default_rng(0).permutation(len(split.labels))
for first in range(0, len(order), 256):  # random batches gathered from the map, as training does
    # (numpy's gather, not torch's: the same reads of the map without torch's ~300 MB of its own)
    idx = order[first : first + 256]
    digest.update(split.images[idx].tobytes())
    digest.update(split.labels[idx].tobytes())
print(digest.hexdigest())
"""

_PREPROCESS = """
import json, sys
from pathlib import Path
from imgclf.config import DatasetConfig, PreprocessConfig
from imgclf.data.prepare import write_processed
entry, pre = DatasetConfig(**json.loads(sys.argv[3])), PreprocessConfig(**json.loads(sys.argv[4]))
write_processed(Path(sys.argv[1]), "big", entry, pre, Path(sys.argv[2]), Path(sys.argv[2]).parent)
"""

LIMIT_MB = 80


def test_a_data_set_twice_the_memory_limit_preprocesses_and_reads_the_same(tmp_path):
    bench = _bench()
    if bench.cgroup_root() is None:
        pytest.skip("needs a writable cgroup v1 memory controller (root)")
    # 181 MiB of processed images, over twice the limit; the processes' own needs are 20-50 MB.
    _write_raw(tmp_path / "raw", 70_000, 6_000, shape=(48, 52))
    env = {"PYTHONPATH": str(ROOT / "src")}
    limited, free = tmp_path / "limited", tmp_path / "free"
    limited.mkdir()
    free.mkdir()
    entry = _idx_entry().model_dump(exclude_unset=True)
    run = bench.measure([sys.executable, "-c", _PREPROCESS, str(limited), str(tmp_path / "raw"), json.dumps(entry),
                         PRE.model_dump_json()], tmp_path, LIMIT_MB, env)
    assert run["rc"] == 0, run
    processed_mb = sum(p.stat().st_size for p in limited.glob("*.npy")) / 2**20
    assert processed_mb > 2 * LIMIT_MB
    # Every page written is charged to the writer's group: twice the limit went through it.
    assert run["peak_charged_mb"] <= LIMIT_MB
    write_processed(free, "big", _idx_entry(), PRE, tmp_path / "raw", tmp_path)
    assert _files(limited) == _files(free)

    train_files = [limited / "train_images.npy", limited / "train_labels.npy"]
    train_mb = sum(p.stat().st_size for p in train_files) / 2**20
    bench.evict(sorted(limited.glob("*.npy")))  # every page is read again, charged to the reader
    assert bench.cached_mb(train_files) in (0, None)
    read = bench.measure([sys.executable, "-c", _READ_BATCHES, str(limited)], tmp_path, LIMIT_MB, env, keep_stdout=True)
    assert read["rc"] == 0, read
    # Not cached before, so every page of the split was read into (and charged to) the group.
    assert train_mb > 1.5 * LIMIT_MB and read["peak_charged_mb"] <= LIMIT_MB and read["major_faults"] > 0
    assert read["peak_anon_mb"] < LIMIT_MB / 2  # the split was mapped, never copied in
    # Seconds with the map advised for random access; without the advice, minutes (docs/scale.md).
    assert read["seconds"] < 60, read
    unlimited = bench.measure([sys.executable, "-c", _READ_BATCHES, str(free)], tmp_path, None, env, keep_stdout=True)
    assert read["stdout"] == unlimited["stdout"] and len(read["stdout"].strip()) == 64
