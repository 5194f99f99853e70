"""The preprocess stage's work: the chosen data set's raw files in, the three splits, their
normalization statistics, meta.json and (image folders) a manifest out.

Built-in sets keep their official test split and split their training images stratified by
class (`dataset.stratified_split`); image folders split by content hash (`folder`). Either way
meta.json records the data set's version and source, so every model can name the data it saw.

`write_processed` streams: the raw images are read from a map (IDX) or decoded on every CPU
(image folders) and each split is written block by block into preallocated memory-mapped files
in the output directory, with the training split's statistics counted on the way, so memory
stays flat as the data grows (docs/scale.md). The output is byte-identical for the same inputs
and seed, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from imgclf.atomic import write_json, write_text
from imgclf.config import DatasetConfig, PreprocessConfig
from imgclf.data import folder
from imgclf.data.archive import MIB, Limits
from imgclf.data.dataset import ChannelStats, stratified_split, write_split
from imgclf.data.download import stored_name
from imgclf.data.raw import load_raw
from imgclf.diskspace import require_free
from imgclf.errors import DataError

MANIFEST = "manifest.csv"


def write_processed(out_dir: Path, name: str, ds: DatasetConfig, pre: PreprocessConfig, raw_dir: Path,
                    root: Path, workers: int | None = None) -> dict[str, Any]:
    """Write the processed data set into `out_dir` (an empty directory: the stage's atomic
    temporary one, so a failure leaves the previous output): `{train,val,test}_{images,labels}.npy`,
    `meta.json` and, for image folders, `manifest.csv`. Returns meta.

    `workers`: image-decoding processes (default: one per CPU this process may use); the
    output is the same for any number.
    """
    if ds.format == "folder":
        workers = workers or len(os.sched_getaffinity(0))
        meta, manifest = _write_folder(out_dir, name, ds, pre, raw_dir, root, workers)
        write_text(out_dir / MANIFEST, manifest)
    else:
        meta = _write_builtin(out_dir, name, ds, pre, raw_dir)
    write_json(out_dir / "meta.json", meta)
    return meta


def _write_builtin(out_dir: Path, name: str, ds: DatasetConfig, pre: PreprocessConfig, raw_dir: Path) -> dict[str, Any]:
    train_full, test = load_raw(raw_dir, ds.format, tuple(ds.classes or ()), archive_limits(name, ds))
    n = len(train_full.labels) + len(test.labels)
    per_image = int(np.prod(train_full.images.shape[1:]))
    require_free(out_dir, n * (per_image + 8) + (1 << 20), f"preprocessing {n:,} images")
    train_idx, val_idx = stratified_split(train_full.labels, pre.val_fraction, pre.seed)
    stats = ChannelStats(train_full.images.shape[1])
    write_split(out_dir, "train", train_full.images, train_full.labels, train_idx, stats)
    write_split(out_dir, "val", train_full.images, train_full.labels, val_idx)
    write_split(out_dir, "test", test.images, test.labels)
    labels = {"train": train_full.labels[train_idx], "val": train_full.labels[val_idx], "test": test.labels}
    # Mirrors are not part of the data's identity (their files must match the checksums), and
    # recording them would retrain every model when a mirror is added: only the files are kept.
    source = {"kind": "download", "files": dict(ds.files or {})}
    version = _digest("".join(f"{k}:{v}\n" for k, v in sorted(source["files"].items())))
    return _meta(name, ds, pre, labels, train_full.images.shape[1:], stats.result(), list(ds.classes or []),
                 source, {"checksums": version})


def _write_folder(out_dir: Path, name: str, ds: DatasetConfig, pre: PreprocessConfig, raw_dir: Path,
                  root: Path, workers: int) -> tuple[dict[str, Any], str]:
    if ds.folder is not None:
        tree = folder.scan_folder(root / ds.folder, ds.folder)
        source, version = _folder_source(root, ds.folder)
    else:
        (file, checksum), = (ds.files or {}).items()
        tree = folder.scan_archive(raw_dir / stored_name(file), archive_limits(name, ds))
        source = {"kind": "archive", "file": file, "checksum": checksum}  # not the mirrors: see above
        version = {"checksum": checksum}
    assert ds.image_size is not None and ds.channels is not None  # DatasetConfig requires both for folders
    plan = folder.ReadPlan(
        shape=(ds.channels, *ds.image_size), resize=ds.resize, val_fraction=pre.val_fraction,
        test_fraction=ds.test_fraction, test_fraction_given="test_fraction" in ds.model_fields_set,
        seed=pre.seed, skip_bad=ds.bad_files == "skip", workers=workers,
        transparency=ds.transparency, blank_images=ds.blank_images, near_duplicates=ds.near_duplicates,
    )
    data = folder.read_tree(tree, plan, out_dir)
    version["content_sha256"] = data.content_sha256
    labels = {k: np.asarray(s.labels) for k, s in data.splits.items()}
    meta = _meta(name, ds, pre, labels, plan.shape, data.stats, data.classes, source, version)
    meta.update(resize=ds.resize, test_fraction=None if data.fixed_test else ds.test_fraction,
                duplicates=data.duplicates, skipped=data.skipped, transparency=ds.transparency,
                blank_images=data.blank, near_duplicates=data.near_duplicates)
    return meta, data.manifest


def archive_limits(name: str, ds: DatasetConfig) -> Limits:
    """The entry's archive limits in bytes, with the params key its messages name."""
    cfg = ds.archive_limits
    return Limits(member_bytes=cfg.max_member_mib * MIB, members=cfg.max_members,
                  total_bytes=cfg.max_total_mib * MIB, key=f"datasets.{name}.archive_limits")


def _folder_source(root: Path, rel: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Where a folder came from and its DVC version, from the `.dvc` file beside it (written by
    `dvc add` or `dvc import`); a folder DVC does not track has only its content digest."""
    dvc_file = root / f"{rel}.dvc"
    if not dvc_file.is_file():
        return {"kind": "folder", "path": rel}, {}
    try:
        record = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
        out = record["outs"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as exc:
        raise DataError(f"{dvc_file}: not a readable .dvc file ({exc})") from None
    version = {"dvc_md5": str(out.get("md5", ""))}
    repo = next((d.get("repo") for d in record.get("deps", []) if isinstance(d, dict) and d.get("repo")), None)
    if repo:
        path = next(d.get("path") for d in record["deps"] if d.get("repo"))
        return ({"kind": "dvc import", "path": rel, "repo": repo.get("url"), "repo_path": path,
                 "rev": repo.get("rev_lock")}, version)
    return {"kind": "dvc add", "path": rel}, version


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _meta(name: str, ds: DatasetConfig, pre: PreprocessConfig, labels: dict[str, np.ndarray], shape: tuple[int, ...],
          stats: tuple[list[float], list[float]], classes: list[str], source: dict[str, Any],
          version: dict[str, str]) -> dict[str, Any]:
    mean, std = stats  # training split only: val/test stay unseen
    return {
        "dataset": name,
        "title": ds.title or name,
        "format": ds.format,
        "classes": classes,
        "shape": [int(d) for d in shape],
        "mean": mean,
        "std": std,
        "counts": {k: len(y) for k, y in labels.items()},
        "counts_per_class": folder.per_class_counts(labels, classes),
        "val_fraction": pre.val_fraction,
        "seed": pre.seed,
        "augment": {"shift": ds.augment.shift, "flip": ds.augment.flip},
        "source": source,
        "version": version,
    }
