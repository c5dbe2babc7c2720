"""Pages rendered by a real headless Chromium (Debian's `chromium`, driven by playwright).

`rendered(browser, target, out)` loads a file or a 127.0.0.1 URL, waits for it to settle, and
returns what a person would see and what went wrong: a full-page screenshot (PNG bytes), the DOM
after scripts ran, console errors and uncaught exceptions, requests that failed, requests that
left the machine (refused: a report must work offline, so any such request is a defect), and the
images that did not load. Tests assert on those; `browser` is one Chromium per test session.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium not found: `make chromium` installs Debian's package "
                    "(apt-get install chromium); or deselect these tests with -m 'not browser'",
                    pytrace=False)
    return found


@dataclass
class Rendered:
    screenshot: bytes
    dom: str
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    page: object = None  # the live playwright Page, for tests that interact (closed by the test's fixture)

    @property
    def problems(self) -> list[str]:
        return [*(f"console: {e}" for e in self.console_errors), *(f"failed: {r}" for r in self.failed_requests),
                *(f"outside: {r}" for r in self.outside_requests), *(f"image: {i}" for i in self.broken_images)]


def _is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("file", "data", "blob", "about") or parts.hostname in LOCAL_HOSTS


def open_page(browser, target: str | Path, *, width: int = 1280, height: int = 900):
    """A new page watching its console and requests, `target` loaded; (page, Rendered-to-fill)."""
    url = Path(target).resolve().as_uri() if isinstance(target, Path) else target
    page = browser.new_page(viewport={"width": width, "height": height})
    seen = Rendered(b"", "", page=page)
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.console_errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: seen.failed_requests.append(f"{r.url} ({r.failure})"))

    def guard(route):
        if _is_local(route.request.url):
            route.continue_()
        else:  # nothing may leave the machine: recorded and refused
            seen.outside_requests.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    page.goto(url, wait_until="networkidle")
    return page, seen


def snapshot(page, seen: Rendered, out: Path | None = None) -> Rendered:
    """Fill `seen` with the page as it is now: screenshot, DOM and the images that did not load."""
    page.wait_for_load_state("networkidle")
    seen.broken_images = page.eval_on_selector_all(
        "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    seen.screenshot = page.screenshot(full_page=True)
    seen.dom = page.content()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "page.png").write_bytes(seen.screenshot)
        (out / "page.html").write_text(seen.dom, encoding="utf-8")
    return seen


def rendered(browser, target: str | Path, out: Path | None = None, **viewport) -> Rendered:
    """Load `target` and return its snapshot (the page stays open in `.page`)."""
    page, seen = open_page(browser, target, **viewport)
    return snapshot(page, seen, out)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the test session. Declared once, in conftest.py: playwright's
    sync API allows one driver per thread, and a fixture imported by two modules would be two."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=executable, args=[
            "--no-sandbox",
            # No name is ever resolved but loopback's, whatever a page or Chromium itself asks for.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--disable-background-networking", "--disable-component-update", "--no-first-run"])
        yield launched
        launched.close()
