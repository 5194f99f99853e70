"""The processed arrays every data set becomes, the built-in sets' train/validation split, and loading.

Processed data is plain `.npy` (uint8 images, int64 labels) plus `meta.json`: no pickles,
byte-identical for the same inputs and seed, and loadable without this library.

Cost grows with the data, not memory: splits are written block by block into preallocated
memory-mapped files (`write_split`), the normalization statistics are counted in the same pass
(`ChannelStats`), and `load_split` maps the files instead of reading them, so training gathers
each batch from the map and the page cache holds what fits (docs/scale.md).
"""

from __future__ import annotations

import json
import math
import mmap as pymmap
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from imgclf.diskspace import preallocate
from imgclf.errors import DataError

SPLITS = ("train", "val", "test")
# Bytes of images per block copied or counted while writing a split: what bounds the memory
# preprocessing needs beyond its per-image bookkeeping (labels, indices, paths).
BLOCK_BYTES = 4 << 20
# pixel -> pixel**2 (255**2 fits 16 bits): squares of a block without a 4- or 8-byte temporary.
_SQUARES = (np.arange(256, dtype=np.uint32) ** 2).astype(np.uint16)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)


def rows_per_block(shape: Sequence[int]) -> int:
    """Images of `shape` (C, H, W) per block of BLOCK_BYTES (at least one)."""
    return max(1, BLOCK_BYTES // max(1, math.prod(shape)))


# meta.json's `version` keys, most specific first: the DVC hash of an image folder, an archive's
# checksum, a digest of the images used, a digest of the built-in files' checksums.
VERSION_KEYS = ("dvc_md5", "checksum", "content_sha256", "checksums")


def source_version(meta: dict[str, Any]) -> tuple[str, str]:
    """(kind, value) of the data set's own version (before preprocessing), from meta.json."""
    version = meta.get("version") or {}
    return next(((k, str(version[k])) for k in VERSION_KEYS if version.get(k)), ("unknown", "unknown"))


def check_labels(labels: np.ndarray, n_classes: int, where: str) -> None:
    bad = int(np.count_nonzero((labels < 0) | (labels >= n_classes)))
    if bad:
        raise DataError(f"{where}: {bad} labels outside 0..{n_classes - 1}")


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted, with every class split in the same proportion.

    This is the project's only train/validation split: later stages read it, never redo it.
    """
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        n_val = int(round(len(members) * val_fraction))
        if n_val == 0 or n_val == len(members):
            raise DataError(
                f"class {int(cls)} has {len(members)} images: val_fraction {val_fraction} leaves "
                "one side of the split empty"
            )
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


class ChannelStats:
    """Per-channel mean and (population) std of pixel/255, counted block by block.

    The sums are exact integers, so the figures do not depend on how the images are cut into
    blocks (nor on the number of preprocessing workers): each is the exact value, correctly
    rounded to the 6 decimals meta.json keeps. (A float64 mean over the whole array, as
    computed before, approximates the same value to ~1e-16 and gives the same 6 decimals.)
    """

    def __init__(self, channels: int) -> None:
        self.pixels = 0  # per channel
        self.sums = [0] * channels
        self.squares = [0] * channels

    def add(self, images: np.ndarray) -> None:
        """One block of uint8 images (N, C, H, W)."""
        if not len(images):
            return
        sums = images.sum(axis=(0, 2, 3), dtype=np.uint64)
        squares = _SQUARES[images].sum(axis=(0, 2, 3), dtype=np.uint64)
        self.pixels += images.size // images.shape[1]
        self.sums = [a + int(b) for a, b in zip(self.sums, sums)]
        self.squares = [a + int(b) for a, b in zip(self.squares, squares)]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.pixels:
            raise ValueError("no images counted")
        n, means, stds = self.pixels, [], []
        for s, q in zip(self.sums, self.squares):
            means.append(round(float(Fraction(s, n * 255)), 6))
            stds.append(round(math.sqrt(Fraction(n * q - s * s, (n * 255) ** 2)), 6))
        return means, stds


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel/255, from the training split only."""
    stats = ChannelStats(images.shape[1])
    step = rows_per_block(images.shape[1:])
    for first in range(0, len(images), step):
        stats.add(np.asarray(images[first : first + step]))
    return stats.result()


def create_split(out_dir: Path, name: str, n: int, shape: Sequence[int]) -> Split:
    """Preallocated, memory-mapped `<name>_images.npy` and `<name>_labels.npy` of n images,
    to be filled in place; the files are what `np.save` of the filled arrays would write."""
    arrays = []
    for kind, dtype, dims in (("images", np.uint8, (n, *shape)), ("labels", np.int64, (n,))):
        path = out_dir / f"{name}_{kind}.npy"
        # A new inode, never a truncated one: a process may still map the old file.
        path.unlink(missing_ok=True)
        array = open_memmap(path, mode="w+", dtype=dtype, shape=tuple(int(d) for d in dims))
        preallocate(path)  # a full disk is ENOSPC here, not SIGBUS when the map is written
        arrays.append(array)
    return Split(*arrays)


def write_split(out_dir: Path, name: str, images: np.ndarray, labels: np.ndarray,
                rows: np.ndarray | None = None, stats: ChannelStats | None = None) -> None:
    """Split `name`: `images[rows]`, `labels[rows]` (every row when `rows` is None), copied block by
    block into preallocated memory-mapped files, so memory stays at one block whatever the size.

    `images` may itself be a map (a raw file, a preprocessing scratch file): a block gathers only
    its rows from it. `stats`, if given, counts every image written.
    """
    n = len(labels) if rows is None else len(rows)
    out = create_split(out_dir, name, n, images.shape[1:])
    step = rows_per_block(images.shape[1:])
    for first in range(0, n, step):
        block = np.asarray(images[first : first + step] if rows is None else images[rows[first : first + step]])
        out.images[first : first + len(block)] = block
        if stats is not None:
            stats.add(block)
    out.labels[:] = labels if rows is None else labels[rows]
    for array in (out.images, out.labels):
        # Written back now, so the pages are clean (the kernel may drop them at once under a
        # memory limit) and the data is on disk before the output directory is renamed into place.
        array.flush()


def map_split(out_dir: Path, name: str) -> Split:
    """Read-only maps of a split this process has just written: no checks (it wrote them) and no
    random-access advice (its callers read it once, in order: the labels, or all of it)."""
    return Split(*(np.load(out_dir / f"{name}_{kind}.npy", mmap_mode="r") for kind in ("images", "labels")))


def load_meta(processed_dir: Path) -> dict[str, Any]:
    path = processed_dir / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `dvc repro preprocess` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def memory_available() -> int | None:
    """Bytes of memory this process could still fill with page cache: the kernel's MemAvailable,
    or less under a cgroup memory limit (the limit minus the group's anonymous memory, which
    cannot be reclaimed). None where /proc does not tell (not Linux)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None
    limited = cgroup_memory()
    if limited is not None:
        limit, anonymous = limited
        available = min(available, limit - anonymous)
    return max(0, available)


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, anonymous bytes in use) of this process's memory cgroup, v1 or v2, or None when
    it has no limit (or this is not Linux). Anonymous memory cannot be reclaimed for the cache."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            group, limit_file, anon_key = Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes", "rss"
        elif hierarchy == "0" and not controllers:  # v2
            group, limit_file, anon_key = Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max", "anon"
        else:
            continue
        try:
            limit = (group / limit_file).read_text().strip()
            stat = dict(x.split() for x in (group / "memory.stat").read_text().splitlines() if x)
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        return int(limit), int(stat.get(anon_key, 0))
    return None


def _advise_random(array: np.memmap) -> None:
    """When the map will not stay in memory, tell the kernel its rows are read at random.

    A page fault on a mapped file normally reads around the page as much as the device's
    read-ahead (8 MB on the reference VM, commonly 128 KB): good when the file will be read
    whole and stay cached (the first epoch then loads it nearly sequentially), ruinous when
    it will not fit, since every miss reads that much again: 190 MB of images read in random
    batches under a 96 MB limit took 164 s, 3.6 s with MADV_RANDOM (docs/scale.md). This is
    advice only: what is read is the same either way.
    """
    mapped = getattr(array, "_mmap", None)  # np.memmap's mmap.mmap (no public accessor)
    available = memory_available()
    if mapped is None or not hasattr(mapped, "madvise") or available is None:
        return
    if array.nbytes > available // 2:  # half: the rest of the process and other files need room too
        mapped.madvise(pymmap.MADV_RANDOM)


def load_split(processed_dir: Path, name: str, meta: dict[str, Any], mmap: bool = True) -> Split:
    """One processed split, checked against meta.json (dtype, shape, label range).

    With `mmap` (the default) the arrays map the files: nothing is read until used, and the
    page cache, not this process, holds what has been read, so a split larger than memory
    trains. The map is copy-on-write: writable like an array in memory (`torch.from_numpy`
    wraps it without a copy or a read-only warning), while a write changes this process's
    pages only, never the file. Without `mmap` the files are read into memory.

    The training split's images are gathered in random batches: if they will not fit in
    memory their map is advised for random access (`_advise_random`).
    """
    arrays = []
    for kind in ("images", "labels"):
        path = processed_dir / f"{name}_{kind}.npy"
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="c" if mmap else None)
        except FileNotFoundError:
            raise DataError(f"{path} is missing: run `dvc repro preprocess` first") from None
        except Exception as exc:  # noqa: BLE001
            # np.load's parser fails on damaged bytes with many types (ValueError, EOFError,
            # BadZipFile, tokenize.TokenError, MemoryError for a forged shape...); with
            # allow_pickle=False none of them can have run code, so all mean the same thing.
            raise DataError(f"{path}: not a plain numeric .npy file ({' '.join(str(exc).split())})") from None
        if not isinstance(array, np.ndarray):
            array.close()  # np.load opens an .npz archive lazily instead of failing
            raise DataError(f"{path}: not a plain numeric .npy file (an .npz archive)")
        if mmap and kind == "images" and name == "train":
            _advise_random(array)
        # A plain ndarray view of the map (no copy): results of indexing it are plain arrays,
        # not np.memmap objects that look file-backed and are not.
        arrays.append(np.asarray(array))
    images, labels = arrays
    shape = tuple(meta["shape"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise DataError(f"{name}_images.npy: expected uint8 (N, {', '.join(map(str, shape))}), "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(f"{name}_labels.npy: expected int64 ({len(images)},), got {labels.dtype} {labels.shape}")
    check_labels(labels, len(meta["classes"]), f"{name}_labels.npy")
    return Split(images, labels)
