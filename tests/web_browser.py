"""Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium, for the page's tests.

Nothing is downloaded: the browser and its driver are the system's, named by path, and Chromium is
started without the network services a fresh profile would contact (sync, component updates...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL_HINT = "install chromium and chromium-driver (apt-get install -y chromium chromium-driver)"
DESKTOP = (1120, 560)
PHONE = (390, 844)


def require_chromium() -> None:
    """Skip the calling test, saying what to install, unless Chromium, its driver and selenium are here."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{INSTALL_HINT}; missing: {', '.join(missing)}")
    pytest.importorskip("selenium", reason="install selenium (requirements/main.txt)")


def start_chromium(profile_dir: Path, size: tuple[int, int] = DESKTOP):  # -> selenium WebDriver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", f"--window-size={size[0]},{size[1]}",
        "--hide-scrollbars",
    ):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
