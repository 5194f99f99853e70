"""Stage `preprocess`: the one stratified train/validation split, plus normalization stats."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import logging

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import PreprocessConfig, load_dataset_name, load_section, read_params
from imgclf.data.dataset import DATASETS, Split, channel_stats, save_processed, stratified_split
from imgclf.data.raw import load_raw
from imgclf.paths import PROCESSED_DIR, RAW_DIR

log = logging.getLogger("preprocess")


def main() -> None:
    params = read_params()
    cfg = load_section("preprocess", PreprocessConfig, params)
    dataset = load_dataset_name(params)
    train_full, test, classes = load_raw(RAW_DIR, dataset)
    train_idx, val_idx = stratified_split(train_full.labels, cfg.val_fraction, cfg.seed)
    train = Split(train_full.images[train_idx], train_full.labels[train_idx])
    val = Split(train_full.images[val_idx], train_full.labels[val_idx])
    mean, std = channel_stats(train.images)  # training split only: val/test stay unseen
    meta = {
        "dataset": dataset,
        "classes": list(classes),
        "shape": list(train.images.shape[1:]),
        "mean": mean,
        "std": std,
        "counts": {"train": len(train.labels), "val": len(val.labels), "test": len(test.labels)},
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "augment": {"shift": DATASETS[dataset].augment_shift, "flip": DATASETS[dataset].augment_flip},
    }
    with atomic_dir(PROCESSED_DIR) as tmp:
        save_processed(tmp, {"train": train, "val": val, "test": test}, meta)
    log.info("split %d train / %d val / %d test images; mean %s std %s",
             len(train.labels), len(val.labels), len(test.labels), mean, std)


if __name__ == "__main__":
    cli.run(main)
