"""Open a report in headless Debian chromium: the DOM after the page's own script ran, and a
screenshot. Tests that need it skip where chromium is not installed (``make test`` installs it
when run as root)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


@dataclass
class Rendered:
    body: str  # the <body ...> start tag, with the data-* attributes the report's script set
    dom: str  # the whole dumped DOM
    screenshot: Path


def render(page: Path, tmp_path: Path, *, width: int = 1280, height: int = 4200) -> Rendered:
    """Load ``page`` (JavaScript on, network off by the page's CSP) and dump what it became."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file(), result.stderr[-2000:]
    match = re.search(r"<body[^>]*>", result.stdout)
    assert match is not None, result.stdout[-2000:]
    return Rendered(body=match.group(0), dom=result.stdout, screenshot=shot)


def body_count(rendered: Rendered, attribute: str) -> int:
    """A count the report's script wrote on <body> (``images``, ``broken-images``); fails if unset."""
    match = re.search(rf'data-{attribute}="(\d+)"', rendered.body)
    assert match is not None, f"data-{attribute} not set by the page's script: {rendered.body}"
    return int(match.group(1))
