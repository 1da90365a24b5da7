"""A page opened in headless Chromium (Debian's `chromium` package, driven by playwright without its own browser
download), with what it logged and fetched. Tests that need it skip, saying why, where either is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers), no GPU, nothing fetched behind the page's back (this machine's network is closed).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@dataclass
class Rendered:
    """The open page, its console messages and uncaught errors (type, text), and every URL it requested."""

    page: Any
    console: list[tuple[str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def chromium_or_skip():
    """playwright's sync API, or a skip naming what to install; a failure instead where the browser is required
    (MOEMERGE_REQUIRE_BROWSER=1, which .ci/run sets after installing chromium), so CI never skips these silently."""
    if not CHROMIUM.is_file():
        if os.environ.get("MOEMERGE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no {CHROMIUM}, and MOEMERGE_REQUIRE_BROWSER=1: the report's browser tests must run here")
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium package (apt-get install -y chromium), as .ci/run does")
    return pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra").sync_playwright


@contextmanager
def opened(page_file: Path, profile: Path, width: int = 1300, height: int = 1000) -> Iterator[Rendered]:
    """`page_file` loaded in a fresh Chromium profile (`profile`, a new folder) until the block ends."""
    sync_playwright = chromium_or_skip()
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.new_page()
            rendered = Rendered(page)
            page.on("console", lambda message: rendered.console.append((message.type, message.text)))
            page.on("pageerror", lambda error: rendered.console.append(("pageerror", str(error))))
            page.on("request", lambda request: rendered.requests.append(request.url))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            yield rendered
        finally:
            context.close()
