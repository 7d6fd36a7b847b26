"""Browser tests' shared helper: Debian chromium driven by playwright, skipped cleanly where missing.

Use from a test module (``tests/`` is on ``sys.path``, as for ``conftest``)::

    from browser import chromium, open_page, save_screenshot

    @pytest.fixture(scope="module")
    def browser():
        with chromium() as browser:      # pytest.skip(...) when chromium or playwright is missing
            yield browser

    def test_page(browser, tmp_path):
        with open_page(browser) as (page, errors):
            page.goto(path.as_uri())
            ...
            save_screenshot(page, "my_view", tmp_path)
        assert errors == []              # console errors and uncaught page errors, as text

CI (``.ci/run``) installs both chromium (apt) and playwright (pip); we never run ``playwright install``:
the browser is Debian's, at ``CHROMIUM``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS_ENV = "GPT2FAST_TEST_ARTIFACTS"
REQUIRE_ENV = "GPT2FAST_REQUIRE_BROWSER"  # set (CI does): a missing browser fails the test instead of skipping it


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} (and {REQUIRE_ENV} is set)")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator:
    """A headless Debian chromium (playwright ``Browser``), closed on exit; skips the test when
    ``/usr/bin/chromium`` or the playwright package is missing (CI installs both)."""
    if not CHROMIUM.exists():
        _missing(f"{CHROMIUM} not found: browser tests need Debian's chromium (CI installs it: apt chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: browser tests need it (CI installs it: pip install playwright)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser, width: int = 1200, height: int = 900) -> Iterator[tuple[object, list[str]]]:
    """A fresh page (its own context) and the list that collects its console errors and uncaught
    exceptions as text; closed on exit."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    try:
        yield page, errors
    finally:
        context.close()


def artifacts_dir(default: Path) -> Path:
    """The folder for test artifacts: env ``GPT2FAST_TEST_ARTIFACTS`` when set (CI keeps it), else ``default``
    (pass pytest's ``tmp_path``); created.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     artifacts_dir(Path(tmp)).is_dir()
    True
    """
    folder = Path(os.environ.get(ARTIFACTS_ENV) or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_screenshot(page, name: str, default: Path, full_page: bool = False) -> Path:
    """A PNG screenshot of ``page`` as ``<artifacts_dir(default)>/<name>.png``; returns its path."""
    path = artifacts_dir(default) / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path
