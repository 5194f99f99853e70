"""Write a sample image folder: Fashion-MNIST images as PNG files in class folders.

    python -m imgclf.data.sample [--per-class N] [--out data/images/fashion_png] [--all]

The images come from the `fashion_mnist` entry of params.yaml, fetched and verified by the
download code (Debian's local copy first, so it works offline where that is installed). The
folder has `train/<class>/` and `test/<class>/` (the official split), N training and N/5 test
images per class, or every image with `--all`. A class name with a `/` (T-shirt/top) becomes
`T-shirt_top`, since folder names are class names. README.md, "Your own images", uses it.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import DownloadConfig, load_dataset, load_section, read_params
from imgclf.data.download import fetch_all
from imgclf.data.raw import load_raw
from imgclf.errors import ConfigError
from imgclf.paths import ROOT

log = logging.getLogger(__name__)

SOURCE = "fashion_mnist"
DEFAULT_OUT = "data/images/fashion_png"


def write_sample(out: Path, per_class: int | None) -> int:
    """Write the folder (atomically: all of it or nothing); return the number of images."""
    params = read_params()
    download = load_section("download", DownloadConfig, params)
    ds = load_dataset(SOURCE, params)
    with tempfile.TemporaryDirectory(prefix="imgclf-sample-") as raw:
        fetch_all(ds.files or {}, ds.mirrors or [], Path(raw), timeout_s=download.timeout_s, retries=download.retries)
        train, test = load_raw(Path(raw), ds.format, tuple(ds.classes or ()))
    folders = [c.replace("/", "_") for c in ds.classes or ()]
    jobs = []
    for split, data, n in (("train", train, per_class), ("test", test, None if per_class is None else
                                                           max(1, per_class // 5))):
        for label, name in enumerate(folders):
            jobs += [(split, name, data.images[i, 0], i) for i in np.flatnonzero(data.labels == label)[:n]]
    with atomic_dir(out) as tmp:
        for split, name, pixels, i in tqdm(jobs, desc=f"write {out.name}", unit="img", mininterval=1.0):
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            # Numbered by position in the official file, so every run writes the same names and bytes.
            Image.fromarray(pixels, "L").save(tmp / split / name / f"{i:05d}.png")
    return len(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m imgclf.data.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300, metavar="N",
                        help="training images per class (test: N/5); default 300")
    parser.add_argument("--all", action="store_true", help="every image (60,000 training, 10,000 test)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder to write, relative to the project (default {DEFAULT_OUT})")
    args = parser.parse_args()
    if args.per_class < 1:
        raise ConfigError(f"--per-class: got {args.per_class}: must be a positive number of images")
    out = ROOT / args.out
    if out.exists():
        raise ConfigError(f"{args.out} already exists: remove it first (or choose --out)")
    n = write_sample(out, None if args.all else args.per_class)
    log.info("wrote %d PNG images to %s; next: dvc add %s", n, args.out, args.out)


if __name__ == "__main__":
    cli.run(main)
