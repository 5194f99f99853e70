"""Headless Chromium for tests that look at a web page the way a person would.

`start_chromium(profile_dir)` returns a Selenium WebDriver for Debian's `chromium`, driven by
Debian's `chromium-driver` (/usr/bin/chromedriver). Selenium is told exactly where both are,
so its Selenium Manager never looks for, or downloads, a browser or a driver.

When the browser or the driver is missing and we run as root with apt-get available, the
packages are installed; otherwise `BrowserUnavailable` says what to install.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

from aptget import apt_install

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# fonts-liberation is only a recommendation of chromium-common; without a font with metrics
# like Arial the screenshots are hard to read. The other recommendations are not needed here.
PACKAGES = ("chromium", "chromium-driver", "fonts-liberation")

FLAGS = (
    "--headless=new",
    "--no-sandbox",  # containers (and root) have no user namespaces for Chromium's sandbox
    "--disable-gpu",
    "--disable-dev-shm-usage",  # /dev/shm is tiny in containers; use /tmp instead
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1600,1000",
)


class BrowserUnavailable(RuntimeError):
    """No headless Chromium can be driven here; the message says what to do."""


def ensure_chromium() -> tuple[Path, Path]:
    """Paths of the browser and its driver, installing Debian's packages first when possible."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return CHROMIUM, CHROMEDRIVER
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrowserUnavailable(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing; install them with "
            "`sudo apt-get install chromium chromium-driver` (Debian/Ubuntu)")
    failure = apt_install(PACKAGES)
    if failure:
        raise BrowserUnavailable(failure)
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise BrowserUnavailable(f"{' '.join(PACKAGES)} installed, but {', '.join(missing)} still missing")
    return CHROMIUM, CHROMEDRIVER


def spki_pin(cert: Path) -> str:
    """The flag that makes Chromium trust exactly this server certificate (its public key's
    SHA-256), as a team member who trusts their own CA would, without touching the machine's
    trust store. Chromium honours it only with --user-data-dir, which start_chromium sets."""
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"--ignore-certificate-errors-spki-list={base64.b64encode(hashlib.sha256(der).digest()).decode()}"


def start_chromium(profile_dir: Path, log_file: Path | None = None, flags: tuple[str, ...] = ()):
    """A headless Chromium WebDriver with a fresh profile in `profile_dir` and `flags` besides
    the usual ones; the caller quits it."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise BrowserUnavailable(f"the Python package selenium is missing ({exc}); run `make venv`") from exc
    browser, driver = ensure_chromium()
    # Selenium Manager would otherwise report usage statistics; it is not asked to find anything.
    os.environ["SE_AVOID_STATS"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = str(browser)
    for flag in (*FLAGS, *flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    service = Service(executable_path=str(driver), log_output=str(log_file) if log_file else subprocess.DEVNULL)
    return webdriver.Chrome(service=service, options=options)
