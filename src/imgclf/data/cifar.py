"""CIFAR-10's binary distribution (`cifar-10-binary.tar.gz`): fixed-size records, no pickles.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): the tarball holds
cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin, batches.meta.txt}. Each .bin file
is a run of 3073-byte records: one label byte (0..9), then 3072 pixel bytes, the 1024 red
values of the 32x32 image row by row, then the 1024 green, then the 1024 blue. That is
already channel-first, so a record's pixels reshape to (3, 32, 32) as they are.
batches.meta.txt lists the class names, one a line, in label order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data.archive import DEFAULT_LIMITS, Limits, read_members
from imgclf.errors import DataError

ARCHIVE = "cifar-10-binary.tar"  # as stored in data/raw (the download decompresses the .gz)
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32

Arrays = tuple[np.ndarray, np.ndarray]  # uint8 images (N, 3, 32, 32), int64 labels (N,)


def encode(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Records of uint8 images (N, 3, 32, 32) and labels (N,) (used by tests to make fixtures)."""
    if images.dtype != np.uint8 or images.shape[1:] != SHAPE or labels.shape != (len(images),):
        raise ValueError(f"expected uint8 images (N, 3, 32, 32) and N labels, got {images.dtype} "
                         f"{images.shape} and {labels.shape}")
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    return records.tobytes()


def decode(data: bytes, name: str, n_classes: int) -> Arrays:
    """Images uint8 (N, 3, 32, 32) and labels int64 (N,) from one batch file's bytes."""
    if not data or len(data) % RECORD:
        raise DataError(f"{name}: {len(data)} bytes is not a whole, non-zero number of {RECORD}-byte "
                        "records (1 label byte + 3072 pixel bytes each)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    bad = int(np.count_nonzero(labels >= n_classes))
    if bad:
        raise DataError(f"{name}: {bad} labels outside 0..{n_classes - 1}")
    return records[:, 1:].reshape(-1, *SHAPE).copy(), labels


def read(archive: Path, classes: tuple[str, ...], limits: Limits = DEFAULT_LIMITS) -> tuple[Arrays, Arrays]:
    """(train images, labels) and (test images, labels) from the tarball, checked record by record.

    Read in memory through the archive's refusal rules (links, absolute or escaping members
    refuse the whole archive), so nothing is extracted to disk.
    """
    names = [f"{FOLDER}/{f}" for f in (*TRAIN_FILES, TEST_FILE, META_FILE)]
    members = read_members(archive, names, limits)
    listed = members[f"{FOLDER}/{META_FILE}"].decode("ascii", errors="replace").split()
    if tuple(listed[: len(classes)]) != classes:
        # A different archive (CIFAR-100, a re-labelled copy) behind the right file name.
        raise DataError(f"{archive.name}: {META_FILE} lists classes {listed[:len(classes)]}, expected {list(classes)}")
    # pop: each file's bytes are freed once decoded (the real archive holds 185 MB of them).
    train = [decode(members.pop(f"{FOLDER}/{f}"), f"{archive.name}:{f}", len(classes)) for f in TRAIN_FILES]
    test = decode(members.pop(f"{FOLDER}/{TEST_FILE}"), f"{archive.name}:{TEST_FILE}", len(classes))
    images = np.concatenate([b[0] for b in train])
    labels = np.concatenate([b[1] for b in train])
    return (images, labels), test
