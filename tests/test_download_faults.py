"""Mirrors that misbehave on purpose, one way each, on a loopback HTTP server.

For every fault the download must either recover from a good mirror listed after the bad one
or fail with one DownloadError line naming each URL it tried and why; transient faults are
retried with exponential back-off, permanent ones are not; and nothing partial or unverified
is ever left in the destination directory, temporary files included.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fixtures import FASHION_FILES, make_fashion_like, make_project, serve_directory, set_params
from imgclf.data import download, idx
from imgclf.data.download import fetch_all, fetch_one, stored_name
from imgclf.errors import DownloadError

# The largest of the tiny files (300 images, ~200 KB of gzip): big enough to be cut in half.
NAME = FASHION_FILES["train_images"]

Fault = Callable[[http.server.BaseHTTPRequestHandler, bytes, threading.Event], None]


def _send(handler: http.server.BaseHTTPRequestHandler, body: bytes, *, length: int | None = None,
          content_type: str = "application/gzip") -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    handler.wfile.write(body)


def not_found(h, payload, release):
    h.send_error(404, "Not Found")


def server_error(h, payload, release):
    h.send_error(500, "Internal Server Error")


def dropped_mid_file(h, payload, release):
    # Announce the whole file, send half of it, hang up.
    _send(h, payload[: len(payload) // 2], length=len(payload))


def truncated_gzip(h, payload, release):
    # The mirror's copy itself is cut short: the Content-Length is true for what is sent.
    cut = payload[: len(payload) // 2]
    _send(h, cut, length=len(cut))


def truncated_gzip_no_length(h, payload, release):
    # Close-delimited body: the client cannot tell a short transfer from a short file.
    _send(h, payload[: len(payload) // 2])


def html_with_200(h, payload, release):
    page = b"<!doctype html><html><body>This file has moved. Please sign in.</body></html>"
    _send(h, page, length=len(page), content_type="text/html")


def wrong_content(h, payload, release):
    # Valid gzip of a valid IDX file, just not the one the checksum names.
    body = gzip.compress(idx.encode(idx.decode(gzip.decompress(payload))[::-1].copy()), mtime=0)
    _send(h, body, length=len(body))


def stall_after_headers(h, payload, release):
    h.send_response(200)
    h.send_header("Content-Length", str(len(payload)))
    h.end_headers()
    h.wfile.flush()
    release.wait(60)


def stall_silent(h, payload, release):
    release.wait(60)


# fault -> (transient?, what the error says about that mirror)
FAULTS: dict[str, tuple[Fault, bool, str]] = {
    "http_404": (not_found, False, "HTTP 404 Not Found"),
    "http_500": (server_error, True, "HTTP 500 Internal Server Error"),
    "dropped_mid_file": (dropped_mid_file, True, "connection broke off after"),
    "truncated_gzip": (truncated_gzip, False, "truncated gzip file (the stream ends early)"),
    "truncated_gzip_no_length": (truncated_gzip_no_length, True, "truncated gzip file (the transfer was"),
    "html_with_200": (html_with_200, False, "not a valid gzip file"),
    "wrong_checksum": (wrong_content, False, "checksum mismatch"),
    "stall_after_headers": (stall_after_headers, True, "timed out after 1s"),
    "stall_silent": (stall_silent, True, "timed out after 1s"),
}
STALLS = {"stall_after_headers", "stall_silent"}


def _serve(handler: type[http.server.BaseHTTPRequestHandler]):
    # Polled more often than fixtures' default: the shutdown poll, paid per server and per
    # test, would otherwise be much of this file's run time.
    return serve_directory(None, handler, poll_interval=0.02)


@contextmanager
def faulty_mirror(fault: Fault, source: Path) -> Iterator[tuple[str, list[float]]]:
    """Answer every GET with `fault` (given the real file from `source`); yield the base URL
    and the monotonic times at which requests arrived."""
    hits: list[float] = []
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(time.monotonic())
            path = source / self.path.rsplit("/", 1)[-1]
            try:
                fault(self, path.read_bytes() if path.is_file() else b"", release)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first, as it should

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with _serve(Handler) as url:
        try:
            yield url, hits
        finally:
            release.set()  # stalled handlers end with the test instead of holding threads


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Iterator[tuple[Path, dict[str, str], str, str]]:
    """The tiny data set, a mirror serving it, and a mirror that has nothing (404s)."""
    base = tmp_path_factory.mktemp("mirrors")
    checksums = make_fashion_like(base / "good")
    (base / "empty").mkdir()
    with serve_directory(base / "good") as good_url, serve_directory(base / "empty") as missing_url:
        yield base / "good", checksums, good_url, missing_url


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_BASE_S", 0.05)


def listing(directory: Path) -> list[str]:
    """Every entry under directory, hidden and temporary ones included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []


def _settings(fault: str, retries: int = 2) -> dict[str, float]:
    # Stalls cost timeout_s per attempt: keep it small there.
    return {"timeout_s": 1 if fault in STALLS else 10, "retries": retries}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_survived_by_moving_to_the_next_mirror(fault, good, tmp_path):
    source, checksums, good_url, _ = good
    handler, transient, _ = FAULTS[fault]
    settings = _settings(fault, retries=0 if fault in STALLS else 2)
    dest = tmp_path / "raw"
    with faulty_mirror(handler, source) as (bad, hits):
        used = fetch_one(NAME, checksums[NAME], [bad, good_url], dest / stored_name(NAME), **settings)
    assert used == good_url
    # Transient faults: one try plus `retries` more; permanent ones: a single try.
    assert len(hits) == (settings["retries"] + 1 if transient else 1)
    assert listing(dest) == [stored_name(NAME)]
    content = (dest / stored_name(NAME)).read_bytes()
    assert hashlib.sha256(content).hexdigest() == checksums[NAME]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_on_every_mirror_fails_in_one_line_naming_each(fault, good, tmp_path):
    source, checksums, _, missing = good
    handler, transient, reason = FAULTS[fault]
    settings = _settings(fault, retries=1 if fault in STALLS else 2)
    dest = tmp_path / "raw"
    started = time.monotonic()
    with faulty_mirror(handler, source) as (bad, _):
        with pytest.raises(DownloadError) as info:
            fetch_one(NAME, checksums[NAME], [bad, missing], dest / stored_name(NAME), **settings)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert message.splitlines() == [message]
    assert message.startswith(f"could not fetch a verified {NAME} from any mirror: ")
    attempts = f" (after {settings['retries'] + 1} attempts)" if transient else ""
    assert f"{bad}{NAME}: {reason}" in message
    assert re.search(re.escape(f"{bad}{NAME}: ") + r"[^;]*" + re.escape(attempts) + "(;|$)", message)
    assert f"{missing}{NAME}: HTTP 404" in message
    # The destination directory may exist (it was made for the temporary files), but is empty.
    assert listing(dest) == []
    if fault in STALLS:
        # Two attempts of timeout_s each plus one short back-off: bounded, not hanging.
        assert 2 * settings["timeout_s"] <= elapsed < 10


def test_retries_back_off_exponentially(good, tmp_path):
    source, checksums, _, _ = good
    with faulty_mirror(server_error, source) as (bad, hits):
        with pytest.raises(DownloadError, match=r"HTTP 500 .*\(after 4 attempts\)"):
            fetch_one(NAME, checksums[NAME], [bad], tmp_path / "raw" / "x", timeout_s=10, retries=3)
    gaps = [b - a for a, b in zip(hits, hits[1:])]
    assert len(gaps) == 3
    # BACKOFF_BASE_S is 0.05 here: pauses of at least 0.05, 0.1 and 0.2 s (a constant pause fails
    # the last two); a small tolerance for the timer's resolution.
    for gap, pause in zip(gaps, (0.05, 0.1, 0.2)):
        assert gap >= pause - 0.005, gaps
    assert sum(gaps) < 5, gaps


def test_malformed_mirror_url_is_skipped_not_a_crash(good, tmp_path):
    # Passes the params schema (right scheme), but urllib cannot parse the host.
    _, checksums, good_url, _ = good
    used = fetch_one(NAME, checksums[NAME], ["http://[::1/data/", good_url], tmp_path / "raw" / "x",
                     timeout_s=10, retries=2)
    assert used == good_url
    with pytest.raises(DownloadError, match=r"http://\[::1/data/" + re.escape(NAME) + r": invalid URL"):
        fetch_one(NAME, checksums[NAME], ["http://[::1/data/"], tmp_path / "raw" / "x", timeout_s=10, retries=2)


def test_oversized_responses_are_refused_before_filling_the_disk(good, tmp_path, monkeypatch):
    _, checksums, big_url, _ = good
    monkeypatch.setattr(download, "MAX_BYTES", 50_000)
    bomb_dir = tmp_path / "bomb"
    bomb_dir.mkdir()
    (bomb_dir / NAME).write_bytes(gzip.compress(bytes(1_000_000), mtime=0))  # ~1 KB sent, 1 MB inside

    def send_file(h, payload, release):
        _send(h, payload, length=len(payload))

    dest = tmp_path / "raw"
    with faulty_mirror(send_file, bomb_dir) as (bomb_url, _):
        # The tiny train images are ~200 KB of gzip: over this test's limit on the wire too.
        with pytest.raises(DownloadError) as info:
            fetch_one(NAME, checksums[NAME], [bomb_url, big_url], dest / "x", timeout_s=10, retries=2)
    message = str(info.value)
    assert f"{bomb_url}{NAME}: decompresses to more than the 50000 bytes allowed" in message
    assert f"{big_url}{NAME}: announces " in message
    assert "attempts" not in message  # permanent: retrying would only fetch it again
    assert listing(dest) == []


def test_fetch_all_recovers_file_by_file_and_leaves_only_verified_files(good, tmp_path):
    source, checksums, good_url, _ = good
    dest = tmp_path / "raw"
    dest.mkdir()
    with faulty_mirror(dropped_mid_file, source) as (bad, hits):
        fetch_all(checksums, [bad, good_url], dest, timeout_s=10, retries=1)
    assert len(hits) == 2 * len(checksums)
    assert listing(dest) == sorted(stored_name(n) for n in checksums)
    for name, sha in checksums.items():
        assert hashlib.sha256((dest / stored_name(name)).read_bytes()).hexdigest() == sha


def test_download_stage_fails_in_one_line_then_succeeds_from_a_good_mirror(good, tmp_path):
    source, checksums, good_url, _ = good
    with faulty_mirror(server_error, source) as (busy, _), faulty_mirror(dropped_mid_file, source) as (cut, _):
        def only_bad_mirrors(params):
            params["download"].update(retries=1, timeout_s=10)
            params["datasets"]["fashion_mnist"].update(mirrors=[busy, cut], files=checksums)

        (tmp_path / "proj").mkdir()
        project = make_project(tmp_path / "proj", only_bad_mirrors)
        proc = project.run("python", "stages/download.py", check=False)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: could not fetch a verified ")
        assert f"{busy}{NAME}: HTTP 500" in last and f"{cut}{NAME}: connection broke off" in last
        assert "Traceback" not in proc.stderr
        data = project.path / "data"
        assert not (data / "raw").exists()
        # No half-filled temporary directory either: only the project's own data/images.
        assert listing(data) == ["images", "images/README.md"]

        set_params(project.path, lambda p: p["datasets"]["fashion_mnist"].update(mirrors=[busy, good_url]))
        project.run("python", "stages/download.py")
    assert listing(data) == sorted(["images", "images/README.md", "raw",
                                    *(f"raw/{stored_name(n)}" for n in checksums)])
