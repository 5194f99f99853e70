"""Stage `download`: fetch the data set's files from the mirrors in params and verify them."""

import _bootstrap  # noqa: F401  (puts this checkout's src/ first on sys.path)

from imgclf import cli
from imgclf.atomic import atomic_dir
from imgclf.config import DownloadConfig, load_section
from imgclf.data.download import fetch_all
from imgclf.paths import RAW_DIR


def main() -> None:
    cfg = load_section("download", DownloadConfig)
    # All files land together or not at all: a failed mirror never leaves half a data set.
    with atomic_dir(RAW_DIR) as tmp:
        fetch_all(cfg.files, cfg.mirrors, tmp, timeout_s=cfg.timeout_s, retries=cfg.retries)


if __name__ == "__main__":
    cli.run(main)
