"""Fetch data files from an ordered list of mirrors and verify their content.

Checksums are SHA-256 of the *decompressed* bytes: mirrors may re-compress (Debian's copy of
Fashion-MNIST has different gzip headers from upstream) but must serve the same content.
Files are stored decompressed, so the data version DVC records does not depend on the mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import socket
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm import tqdm

from imgclf.atomic import atomic_path
from imgclf.errors import DownloadError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "imgclf-download/1 (+https://dvc.org)"


class _Transient(Exception):
    """A failure worth retrying on the same mirror (network, 5xx)."""


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix (404, wrong content)."""


def stored_name(name: str) -> str:
    """The file name in data/raw: the decompressed name (`x.gz` -> `x`)."""
    return name[:-3] if name.endswith(".gz") else name


def fetch_all(files: dict[str, str], mirrors: list[str], dest: Path, *, timeout_s: float, retries: int) -> None:
    """Fetch and verify every file (name -> content SHA-256) into dest, or raise DownloadError."""
    for name, sha256 in files.items():
        fetch_one(name, sha256, mirrors, dest / stored_name(name), timeout_s=timeout_s, retries=retries)


def fetch_one(name: str, sha256: str, mirrors: list[str], target: Path, *, timeout_s: float, retries: int) -> str:
    """Fetch `name` from the first mirror that serves verified content; return that mirror."""
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        for attempt in range(retries + 1):
            try:
                with atomic_path(target) as tmp:
                    _download_verified(url, name, sha256, tmp, timeout_s)
                log.info("%s: verified from %s", name, mirror)
                return mirror
            except _Permanent as exc:
                failures.append(f"{url}: {exc}")
                break
            except _Transient as exc:
                if attempt == retries:
                    failures.append(f"{url}: {exc} (after {retries + 1} attempts)")
                    break
                delay = 0.5 * 2**attempt
                log.warning("%s: %s; retrying in %.1fs", url, exc, delay)
                time.sleep(delay)
        log.warning("%s: giving up on %s", name, mirror)
    raise DownloadError(f"could not fetch a verified {name} from any mirror: " + "; ".join(failures))


def _download_verified(url: str, name: str, sha256: str, out: Path, timeout_s: float) -> None:
    raw = out.with_name(out.name + ".download")
    try:
        _download(url, name, raw, timeout_s)
        digest = _decompress_and_hash(raw, out, compressed=name.endswith(".gz"))
    finally:
        raw.unlink(missing_ok=True)
    if digest != sha256:
        raise _Permanent(f"checksum mismatch: content SHA-256 is {digest}, expected {sha256}")


def _download(url: str, name: str, out: Path, timeout_s: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, out.open("wb") as fh:
            total = response.headers.get("Content-Length")
            with tqdm(
                total=int(total) if total and total.isdigit() else None,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=None,  # no bar when stderr is not a terminal (CI logs, dvc repro > log)
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        kind = _Transient if exc.code >= 500 or exc.code == 429 else _Permanent
        raise kind(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, FileNotFoundError) or (isinstance(reason, str) and "No such file" in reason):
            raise _Permanent("not found") from None
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"timed out after {timeout_s:g}s") from None
        raise _Transient(f"cannot connect ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise _Transient(f"timed out after {timeout_s:g}s") from None
    except (http.client.IncompleteRead, ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"connection broke off ({type(exc).__name__})") from None
    except OSError as exc:
        raise _Permanent(f"cannot read ({exc.strerror or exc})") from None


def _decompress_and_hash(raw: Path, out: Path, *, compressed: bool) -> str:
    digest = hashlib.sha256()
    try:
        with (gzip.open(raw, "rb") if compressed else raw.open("rb")) as src, out.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # A truncated stream is usually a transfer cut short; an HTML error page is not gzip.
        kind = _Transient if isinstance(exc, EOFError) else _Permanent
        raise kind(f"not a valid gzip file ({exc})") from None
    return digest.hexdigest()

