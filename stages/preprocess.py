"""Stage `preprocess`: the chosen data set as train/validation/test arrays, normalization stats
and meta.json (plus manifest.csv for image folders: which image went to which split)."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import logging

from imgclf import cli
from imgclf.atomic import atomic_dir, write_text
from imgclf.config import PreprocessConfig, load_dataset, load_dataset_name, load_section, read_params
from imgclf.data.dataset import save_processed
from imgclf.data.prepare import prepare
from imgclf.paths import PROCESSED_DIR, RAW_DIR, ROOT

log = logging.getLogger("preprocess")


def main() -> None:
    params = read_params()
    cfg = load_section("preprocess", PreprocessConfig, params)
    name = load_dataset_name(params)
    out = prepare(name, load_dataset(name, params), cfg, RAW_DIR, ROOT)
    with atomic_dir(PROCESSED_DIR) as tmp:
        save_processed(tmp, out.splits, out.meta)
        if out.manifest is not None:
            write_text(tmp / "manifest.csv", out.manifest)
    counts = out.meta["counts"]
    log.info("%s: %d train / %d val / %d test images in %d classes; mean %s std %s", name, counts["train"],
             counts["val"], counts["test"], len(out.meta["classes"]), out.meta["mean"], out.meta["std"])


if __name__ == "__main__":
    cli.run(main)
