"""Stage `preprocess`: the chosen data set as train/validation/test arrays, normalization stats
and meta.json (plus manifest.csv for image folders: which image went to which split)."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

import logging

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import PreprocessConfig, load_dataset, load_dataset_name, load_section, read_params
from imgclf.data.prepare import write_processed
from imgclf.paths import PROCESSED_DIR, RAW_DIR, ROOT

log = logging.getLogger("preprocess")


def main() -> None:
    params = read_params()
    cfg = load_section("preprocess", PreprocessConfig, params)
    name = load_dataset_name(params)
    ds = load_dataset(name, params)
    # Written straight into the atomic directory: streamed there, and a failure leaves the old output.
    with atomic_dir(PROCESSED_DIR) as tmp:
        meta = write_processed(tmp, name, ds, cfg, RAW_DIR, ROOT)
    counts = meta["counts"]
    log.info("%s: %d train / %d val / %d test images in %d classes; mean %s std %s", name, counts["train"],
             counts["val"], counts["test"], len(meta["classes"]), meta["mean"], meta["std"])


if __name__ == "__main__":
    cli.run(main)
