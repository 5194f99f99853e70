"""Installing a Debian package a test needs (root with apt-get), waiting for the dpkg lock."""

from __future__ import annotations

import os
import subprocess


def apt_install(packages: tuple[str, ...]) -> str | None:
    """Install `packages`; None on success, else why not (apt-get's output)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for the dpkg lock instead of failing when someone else is installing something.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", "--no-install-recommends",
               *packages]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode == 0:
        return None
    # A fresh container usually has no package lists yet.
    subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"], env=env,
                   capture_output=True, text=True)
    second = subprocess.run(install, env=env, capture_output=True, text=True)
    if second.returncode == 0:
        return None
    return f"apt-get install {' '.join(packages)} failed ({second.returncode}):\n{second.stdout}\n{second.stderr}"
