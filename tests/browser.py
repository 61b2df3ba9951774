"""Headless Chromium for tests that look at pages the product writes (the HTML report).

Debian's `chromium-headless-shell` (no display, no GPU needed); installed with apt the first time, as the
local stack installs its servers. Runs as root in CI, hence `--no-sandbox`; pages are our own files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--allow-file-access-from-files")


def chromium(install: bool = True) -> str:
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    if not install:
        raise FileNotFoundError(f"no headless Chromium on PATH (looked for {', '.join(CANDIDATES)})")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=120", "-qq"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for args in (["update"], ["install", "-y", "--no-install-recommends", "chromium-headless-shell"]):
        done = subprocess.run([*apt, *args], capture_output=True, text=True, timeout=900, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"apt-get {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return chromium(install=False)


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1600) -> Path:
    subprocess.run(
        [chromium(), *BASE_FLAGS, f"--screenshot={png}", f"--window-size={width},{height}", page.resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    return png


def dump_dom(page: Path) -> str:
    """The DOM after the page loaded, as Chromium serialises it."""
    done = subprocess.run([chromium(), *BASE_FLAGS, "--dump-dom", page.resolve().as_uri()], check=True,
                          capture_output=True, timeout=120, text=True)
    return done.stdout
