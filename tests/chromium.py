"""Drive Debian's headless Chromium from tests (CI installs the ``chromium`` package): find the
binary, dump a page's DOM after its scripts ran, take a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> list[str]:
    """The command prefix (binary and flags), or skip the test where no Chromium is installed."""
    binary = chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return [binary, *CHROMIUM_FLAGS]


def _url(page: Path | str) -> str:
    return page.resolve().as_uri() if isinstance(page, Path) else page


def dump_dom(page: Path | str, profile: Path, budget_ms: int = 5000) -> str:
    """The DOM of ``page`` (a local file, or a ``file://`` URL) after its scripts ran."""
    cmd = [*require_chromium(), f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    return subprocess.run(
        [*cmd, "--dump-dom", _url(page)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def screenshot(page: Path | str, shot: Path, profile: Path, size: str = "1280,2000") -> Path:
    """A PNG screenshot of ``page`` written to ``shot``."""
    cmd = [*require_chromium(), f"--user-data-dir={profile}"]
    subprocess.run(
        [*cmd, f"--screenshot={shot}", f"--window-size={size}", _url(page)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return shot
