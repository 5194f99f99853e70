"""The official train and test splits, read from data/raw in whichever format the data set has.

Only the preprocess stage reads raw files, so the format readers (idx, cifar) are imported
here rather than by imgclf.data.dataset, which the training and evaluation stages import:
a change to a reader then reruns preprocess, not every model (dvc.yaml lists each stage's code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data import cifar, idx
from imgclf.data.archive import DEFAULT_LIMITS, Limits
from imgclf.data.dataset import Split, check_labels
from imgclf.errors import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_raw(raw_dir: Path, format: str, classes: tuple[str, ...],
             limits: Limits = DEFAULT_LIMITS) -> tuple[Split, Split]:
    """Official train and test splits from data/raw, checked for shape and label range.

    `format`: "idx", the four IDX files of the MNIST family; "cifar", CIFAR-10's binary tarball
    (read within `limits`).
    """
    if format == "cifar":
        (train_images, train_labels), (test_images, test_labels) = cifar.read(raw_dir / cifar.ARCHIVE, classes, limits)
        return Split(train_images, train_labels), Split(test_images, test_labels)
    train, test = (_read_idx(raw_dir, *IDX_FILES[split], len(classes)) for split in ("train", "test"))
    return train, test


def _read_idx(raw_dir: Path, images_name: str, labels_name: str, n_classes: int) -> Split:
    images = idx.open_map(raw_dir / images_name)  # mapped: preprocessing reads only the rows it copies
    labels = idx.read(raw_dir / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{raw_dir / images_name}: expected N images of HxW and N labels, "
            f"got images {images.shape} and labels {labels.shape}"
        )
    check_labels(labels, n_classes, str(raw_dir / labels_name))
    # One gray channel: every split is (N, C, H, W), whatever the data set.
    return Split(images[:, None, :, :], labels.astype(np.int64))
