"""The download stage's code path against real-format files on a loopback HTTP server."""

import gzip
import http.server

import numpy as np
import pytest

from fixtures import FASHION_FILES, make_fashion_like, serve_directory
from imgclf.data import idx
from imgclf.data.download import fetch_all, fetch_one
from imgclf.errors import DataError, DownloadError


def test_idx_round_trip_and_header_checks():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx.encode(array)
    assert np.array_equal(idx.decode(data), array)
    with pytest.raises(DataError, match="header says 24 bytes"):
        idx.decode(data[:-1])
    with pytest.raises(DataError, match="bad magic"):
        idx.decode(b"\x01" + data[1:])


def test_fetch_all_verifies_and_stores_decompressed(tiny_fashion, tmp_path):
    mirror, checksums = tiny_fashion
    dest = tmp_path / "raw"
    dest.mkdir()
    with serve_directory(mirror) as url:
        fetch_all(checksums, [url], dest, timeout_s=5, retries=0)
    stored = sorted(p.name for p in dest.iterdir())
    assert stored == sorted(name[:-3] for name in FASHION_FILES.values())
    labels = idx.read(dest / "train-labels-idx1-ubyte")
    assert labels.shape == (300,) and set(labels.tolist()) == set(range(10))


def test_mirror_order_local_copy_with_other_gzip_header_verifies(tiny_fashion, tmp_path):
    # A mirror that re-compressed the files (different gzip header) serves the same content.
    mirror, checksums = tiny_fashion
    recompressed = tmp_path / "debian"
    recompressed.mkdir()
    for name in checksums:
        content = gzip.decompress((mirror / name).read_bytes())
        (recompressed / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=123456))
    assert (recompressed / name).read_bytes() != (mirror / name).read_bytes()
    target = tmp_path / "out" / "x"
    used = fetch_one(name, checksums[name], [recompressed.as_uri() + "/"], target, timeout_s=5, retries=0)
    assert used.startswith("file://") and target.exists()


def test_wrong_checksum_moves_to_next_mirror(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    checksums = make_fashion_like(good, seed=0)
    make_fashion_like(bad, seed=1)  # same names, different content
    name = FASHION_FILES["train_labels"]
    target = tmp_path / "raw" / "labels"
    with serve_directory(bad) as bad_url, serve_directory(good) as good_url:
        used = fetch_one(name, checksums[name], [bad_url, good_url], target, timeout_s=5, retries=0)
    assert used == good_url


def test_all_mirrors_failing_names_each_and_leaves_nothing(tiny_fashion, tmp_path):
    mirror, checksums = tiny_fashion
    name = FASHION_FILES["test_labels"]
    (tmp_path / "html").mkdir()
    (tmp_path / "html" / name).write_text("<html>Sorry, moved</html>")
    missing = (tmp_path / "nowhere").as_uri() + "/"
    target = tmp_path / "raw" / "labels"
    with serve_directory(tmp_path / "html") as html_url:
        with pytest.raises(DownloadError) as info:
            fetch_one(name, checksums[name], [missing, html_url], target, timeout_s=5, retries=0)
    message = str(info.value)
    assert f"{missing}{name}: not found" in message
    assert f"{html_url}{name}: not a valid gzip file" in message
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary leftovers either


def test_server_errors_are_retried_then_next_mirror(tiny_fashion, tmp_path):
    mirror, checksums = tiny_fashion
    calls = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(self.path)
            self.send_error(503, "busy")

        def log_message(self, *args):
            pass

    name = FASHION_FILES["test_labels"]
    with serve_directory(tmp_path, handler=Flaky) as flaky, serve_directory(mirror) as good:
        used = fetch_one(name, checksums[name], [flaky, good], tmp_path / "out" / "f", timeout_s=5, retries=2)
    assert used == good
    assert len(calls) == 3  # one try plus two retries, then the next mirror


def test_404_is_not_retried(tiny_fashion, tmp_path):
    mirror, checksums = tiny_fashion
    name = FASHION_FILES["test_labels"]
    with serve_directory(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None) as empty:
        with pytest.raises(DownloadError, match="HTTP 404") as info:
            fetch_one(name, checksums[name], [empty], tmp_path / "o" / "f", timeout_s=5, retries=3)
    assert "after" not in str(info.value)
