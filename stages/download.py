"""Stage `download`: fetch the chosen data set's files from its mirrors in params and verify them.

An image folder tracked by DVC (`folder:`) has nothing to fetch: DVC itself brings it
(`dvc pull`, `dvc import`), and data/raw stays empty.
"""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import DownloadConfig, load_dataset, load_section, read_params
from imgclf.data.download import fetch_all
from imgclf.paths import RAW_DIR


def main() -> None:
    params = read_params()
    cfg = load_section("download", DownloadConfig, params)
    # Only this data set's entry: dvc.yaml makes the stage depend on `datasets.<dataset>` alone,
    # so editing another data set's mirrors reruns nothing.
    source = load_dataset(cfg.dataset, params)
    # All files land together or not at all: a failed mirror never leaves half a data set.
    with atomic_dir(RAW_DIR) as tmp:
        if source.files is not None and source.mirrors is not None:
            fetch_all(source.files, source.mirrors, tmp, timeout_s=cfg.timeout_s, retries=cfg.retries)


if __name__ == "__main__":
    cli.run(main)
