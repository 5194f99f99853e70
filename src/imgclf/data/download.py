"""Fetch data files from an ordered list of mirrors and verify their content.

A bare checksum is the SHA-256 of the *decompressed* bytes: mirrors may re-compress (Debian's
copy of Fashion-MNIST has different gzip headers from upstream) but must serve the same
content. `md5:<hex>` is the MD5 of the file exactly as served, for archives whose publishers
give only that (torchvision's MNIST list, CIFAR-10's page). Files are stored decompressed
(`x.gz` as `x`) either way, so the data version DVC records does not depend on the mirror's
gzip framing.

Every failure is sorted into one of two kinds: transient (the network or a busy server; the
same mirror is tried again after an exponentially growing pause) and permanent (the mirror
answers, but with the wrong thing; the next mirror is tried at once). Nothing unverified is
ever left at the target path: bytes go to temporary siblings that are removed on any failure.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import re
import socket
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from imgclf.atomic import atomic_path
from imgclf.config import check_checksum, check_file_names, check_mirrors
from imgclf.errors import ConfigError, DownloadError
from imgclf.redact import masked, masked_text

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "imgclf-download/1 (+https://dvc.org)"

# Pause before the first retry on one mirror, doubled for each further retry (tests shrink it).
BACKOFF_BASE_S = 0.5
# Far above any file of these data sets (CIFAR-10's tar is 185 MB decompressed): a mirror that
# streams more (an endless response, a gzip bomb) is refused before it can fill the disk.
# Checked both for the bytes received and for the bytes they decompress to.
MAX_BYTES = 1 << 30
_MD5 = "md5:"


class _Transient(Exception):
    """A failure worth retrying on the same mirror (network, 5xx, a transfer cut short)."""


class _Permanent(Exception):
    """A failure that retrying the same mirror will not fix (404, wrong content)."""


def stored_name(name: str) -> str:
    """The file name in data/raw: the decompressed name (`x.gz` -> `x`)."""
    return name[:-3] if name.endswith(".gz") else name


def fetch_all(files: dict[str, str], mirrors: list[str], dest: Path, *, timeout_s: float, retries: int) -> None:
    """Fetch and verify every file (name -> checksum) into dest, or raise DownloadError."""
    # Every name is checked before the first byte is fetched: a bad entry fails in seconds.
    # (The params schema runs the same checks; this guards callers that bypass it.)
    _check(check_file_names, list(files))
    _check(check_mirrors, mirrors)
    for name, checksum in files.items():
        fetch_one(name, checksum, mirrors, dest / stored_name(name), timeout_s=timeout_s, retries=retries)


def fetch_one(name: str, checksum: str, mirrors: list[str], target: Path, *, timeout_s: float, retries: int) -> str:
    """Fetch `name` from the first mirror that serves verified content; return that mirror.

    `checksum` is a content SHA-256 (64 hex digits) or `md5:<32 hex digits>` of the file as served.
    """
    _check(check_file_names, [name])
    _check(check_checksum, checksum, f"files: checksum {checksum!r} ")
    _check(check_mirrors, mirrors)
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        shown = masked(url)  # what messages show of it: no credential in any form
        for attempt in range(retries + 1):
            try:
                with atomic_path(target) as tmp:
                    _download_verified(url, name, checksum, tmp, timeout_s)
                log.info("%s: verified from %s", name, masked(mirror))
                return mirror
            except _Permanent as exc:
                failures.append(f"{shown}: {exc}")
                break
            except _Transient as exc:
                if attempt == retries:
                    failures.append(f"{shown}: {exc} (after {retries + 1} attempts)")
                    break
                delay = BACKOFF_BASE_S * 2**attempt
                log.warning("%s: %s; retrying in %.3gs", shown, exc, delay)
                time.sleep(delay)
        log.warning("%s: giving up on %s", name, masked(mirror))
    tried = "; ".join(failures) or "no mirror given"
    # One line whatever a server put in its reason phrase: the CLI prints this as `error: ...`.
    # Masked again: a library's reason (an invalid URL, a redirect) may quote a URL itself.
    raise DownloadError(masked_text(" ".join(f"could not fetch a verified {name} from any mirror: {tried}".split())))


def _check(check: Callable[[Any], Any], value: Any, what: str = "") -> None:
    """One of the params schema's source checks, as the ConfigError a stage reports."""
    try:
        check(value)
    except ValueError as exc:
        raise ConfigError(f"{what}{exc}") from None


def _download_verified(url: str, name: str, checksum: str, out: Path, timeout_s: float) -> None:
    raw = out.with_name(out.name + ".download")
    try:
        complete = _download(url, name, raw, timeout_s)
        # Decompressing first, even for an MD5 of the raw bytes: a cut-short transfer then shows
        # as a truncated gzip (retried) rather than as a wrong checksum (not retried).
        digest = _decompress_and_hash(raw, out, compressed=name.endswith(".gz"), complete=complete)
        if checksum.startswith(_MD5):
            served = _md5(raw)
            if served != checksum.removeprefix(_MD5):
                raise _Permanent(f"checksum mismatch: MD5 of the file as served is {served}, "
                                 f"expected {checksum.removeprefix(_MD5)}")
    finally:
        raw.unlink(missing_ok=True)
    if not checksum.startswith(_MD5) and digest != checksum:
        raise _Permanent(f"checksum mismatch: content SHA-256 is {digest}, expected {checksum}")


def _md5(path: Path) -> str:
    # MD5 is what these publishers list; it catches a corrupt or wrong file, which is its job
    # here. usedforsecurity=False keeps FIPS-mode Pythons from refusing it.
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _Permanent(f"cannot read it back ({exc.strerror or exc})") from None
    return digest.hexdigest()


def _download(url: str, name: str, out: Path, timeout_s: float) -> bool:
    """Copy url to out; True when the transfer is known to be whole (a met Content-Length)."""
    local = url.startswith("file:")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(request, timeout=timeout_s) as response, out.open("wb") as fh:
            header = response.headers.get("Content-Length")
            total = int(header) if header and re.fullmatch(r"[0-9]+", header) else None
            if total is not None and total > MAX_BYTES:
                raise _Permanent(f"announces {total} bytes, more than the {MAX_BYTES} allowed")
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=name,
                disable=None,  # no bar when stderr is not a terminal (CI logs, dvc repro > log)
                leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > MAX_BYTES:
                        raise _Permanent(f"sent more than the {MAX_BYTES} bytes allowed")
                    fh.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        kind = _Transient if exc.code >= 500 or exc.code == 429 else _Permanent
        raise kind(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, FileNotFoundError) or (isinstance(reason, str) and "No such file" in reason):
            raise _Permanent("not found") from None
        if local:
            # A local file reads the same on every attempt: retrying cannot help.
            raise _Permanent(f"cannot read ({getattr(reason, 'strerror', None) or reason})") from None
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"timed out after {timeout_s:g}s") from None
        raise _Transient(f"cannot connect ({reason})") from None
    except TimeoutError:
        raise _Transient(f"timed out after {timeout_s:g}s") from None
    except (http.client.InvalidURL, ValueError) as exc:
        # Malformed host, port or IPv6 literal: no attempt on this mirror can succeed.
        raise _Permanent(f"invalid URL ({exc})") from None
    except (http.client.IncompleteRead, ConnectionError, http.client.HTTPException) as exc:
        raise _Transient(f"connection broke off ({type(exc).__name__})") from None
    except OSError as exc:
        raise _Permanent(f"cannot read ({exc.strerror or exc})") from None
    if total is not None and received < total:
        # http.client returns a short body without complaint when the peer closes early.
        raise _Transient(f"connection broke off after {received} of {total} bytes")
    return total is not None or local


def _decompress_and_hash(raw: Path, out: Path, *, compressed: bool, complete: bool) -> str:
    digest = hashlib.sha256()
    size = 0
    try:
        with (gzip.open(raw, "rb") if compressed else raw.open("rb")) as src, out.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                size += len(chunk)
                if size > MAX_BYTES:
                    raise _Permanent(f"decompresses to more than the {MAX_BYTES} bytes allowed")
                digest.update(chunk)
                dst.write(chunk)
    except EOFError:
        if complete:
            # Every announced byte arrived, so the mirror's own copy is cut short.
            raise _Permanent("truncated gzip file (the stream ends early)") from None
        # No length to check the transfer against: most likely it was cut short.
        raise _Transient("truncated gzip file (the transfer was probably cut short)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        # An HTML error page, or other bytes that were never gzip.
        raise _Permanent(f"not a valid gzip file ({exc})") from None
    except OSError as exc:
        raise _Permanent(f"cannot store it ({exc.strerror or exc})") from None
    return digest.hexdigest()
