"""Stage `download`: fetch the chosen data set's files from its mirrors in params and verify them."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import DownloadConfig, load_section, load_source, read_params
from imgclf.data.download import fetch_all
from imgclf.paths import RAW_DIR


def main() -> None:
    params = read_params()
    cfg = load_section("download", DownloadConfig, params)
    # Only this data set's entry: dvc.yaml makes the stage depend on `datasets.<dataset>` alone,
    # so editing another data set's mirrors reruns nothing.
    source = load_source(cfg.dataset, params)
    # All files land together or not at all: a failed mirror never leaves half a data set.
    with atomic_dir(RAW_DIR) as tmp:
        fetch_all(source.files, source.mirrors, tmp, timeout_s=cfg.timeout_s, retries=cfg.retries)


if __name__ == "__main__":
    cli.run(main)
