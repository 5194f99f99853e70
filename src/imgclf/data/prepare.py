"""The preprocess stage's work: the chosen data set's raw files in, the three splits, their
normalization statistics, meta.json and (image folders) a manifest out.

Built-in sets keep their official test split and split their training images stratified by
class (`dataset.stratified_split`); image folders split by content hash (`folder`). Either way
meta.json records the data set's version and source, so every model can name the data it saw.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imgclf.config import DatasetConfig, PreprocessConfig
from imgclf.data import folder
from imgclf.data.dataset import Split, channel_stats, stratified_split
from imgclf.data.download import stored_name
from imgclf.data.raw import load_raw
from imgclf.errors import DataError


@dataclass(frozen=True)
class Prepared:
    splits: dict[str, Split]
    meta: dict[str, Any]
    manifest: str | None  # CSV, image folders only


def prepare(name: str, ds: DatasetConfig, pre: PreprocessConfig, raw_dir: Path, root: Path) -> Prepared:
    if ds.format == "folder":
        return _prepare_folder(name, ds, pre, raw_dir, root)
    train_full, test = load_raw(raw_dir, ds.format, tuple(ds.classes or ()))
    train_idx, val_idx = stratified_split(train_full.labels, pre.val_fraction, pre.seed)
    splits = {
        "train": Split(train_full.images[train_idx], train_full.labels[train_idx]),
        "val": Split(train_full.images[val_idx], train_full.labels[val_idx]),
        "test": test,
    }
    # Mirrors are not part of the data's identity (their files must match the checksums), and
    # recording them would retrain every model when a mirror is added: only the files are kept.
    source = {"kind": "download", "files": dict(ds.files or {})}
    version = _digest("".join(f"{k}:{v}\n" for k, v in sorted(source["files"].items())))
    meta = _meta(name, ds, pre, splits, list(ds.classes or []), source, {"checksums": version})
    return Prepared(splits, meta, None)


def _prepare_folder(name: str, ds: DatasetConfig, pre: PreprocessConfig, raw_dir: Path, root: Path) -> Prepared:
    if ds.folder is not None:
        tree = folder.scan_folder(root / ds.folder, ds.folder)
        source, version = _folder_source(root, ds.folder)
    else:
        (file, checksum), = (ds.files or {}).items()
        tree = folder.scan_archive(raw_dir / stored_name(file))
        source = {"kind": "archive", "file": file, "checksum": checksum}  # not the mirrors: see above
        version = {"checksum": checksum}
    assert ds.image_size is not None and ds.channels is not None  # DatasetConfig requires both for folders
    plan = folder.ReadPlan(
        shape=(ds.channels, *ds.image_size), resize=ds.resize, val_fraction=pre.val_fraction,
        test_fraction=ds.test_fraction, test_fraction_given="test_fraction" in ds.model_fields_set,
        seed=pre.seed, skip_bad=ds.bad_files == "skip", workers=len(os.sched_getaffinity(0)),
    )
    data = folder.read_tree(tree, plan)
    version["content_sha256"] = data.content_sha256
    meta = _meta(name, ds, pre, data.splits, data.classes, source, version)
    meta.update(resize=ds.resize, test_fraction=None if data.fixed_test else ds.test_fraction,
                duplicates=data.duplicates, skipped=data.skipped)
    return Prepared(data.splits, meta, data.manifest)


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


def _meta(name: str, ds: DatasetConfig, pre: PreprocessConfig, splits: dict[str, Split], classes: list[str],
          source: dict[str, Any], version: dict[str, str]) -> dict[str, Any]:
    train = splits["train"]
    mean, std = channel_stats(train.images)  # training split only: val/test stay unseen
    return {
        "dataset": name,
        "title": ds.title or name,
        "format": ds.format,
        "classes": classes,
        "shape": list(train.images.shape[1:]),
        "mean": mean,
        "std": std,
        "counts": {k: len(s.labels) for k, s in splits.items()},
        "counts_per_class": folder.per_class_counts(splits, classes),
        "val_fraction": pre.val_fraction,
        "seed": pre.seed,
        "augment": {"shift": ds.augment.shift, "flip": ds.augment.flip},
        "source": source,
        "version": version,
    }
