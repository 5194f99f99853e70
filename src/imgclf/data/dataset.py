"""The processed arrays every data set becomes, the built-in sets' train/validation split, and loading.

Processed data is plain `.npy` (uint8 images, int64 labels) plus `meta.json`: no pickles,
byte-identical for the same inputs and seed, and loadable without this library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgclf.atomic import write_json
from imgclf.errors import DataError


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)


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


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel/255, from the training split only."""
    x = images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = x.std(axis=(0, 2, 3))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def save_processed(out_dir: Path, splits: dict[str, Split], meta: dict[str, Any]) -> None:
    for name, split in splits.items():
        np.save(out_dir / f"{name}_images.npy", np.ascontiguousarray(split.images), allow_pickle=False)
        np.save(out_dir / f"{name}_labels.npy", split.labels, allow_pickle=False)
    write_json(out_dir / "meta.json", meta)


def load_meta(processed_dir: Path) -> dict[str, Any]:
    path = processed_dir / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `dvc repro preprocess` first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def load_split(processed_dir: Path, name: str, meta: dict[str, Any]) -> Split:
    """One processed split, checked against meta.json (dtype, shape, label range)."""
    arrays = []
    for kind in ("images", "labels"):
        path = processed_dir / f"{name}_{kind}.npy"
        try:
            array = np.load(path, allow_pickle=False)
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
        arrays.append(array)
    images, labels = arrays
    shape = tuple(meta["shape"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape:
        raise DataError(f"{name}_images.npy: expected uint8 (N, {', '.join(map(str, shape))}), "
                        f"got {images.dtype} {images.shape}")
    if labels.dtype != np.int64 or labels.shape != (len(images),):
        raise DataError(f"{name}_labels.npy: expected int64 ({len(images)},), got {labels.dtype} {labels.shape}")
    check_labels(labels, len(meta["classes"]), f"{name}_labels.npy")
    return Split(images, labels)
