"""Browser end-to-end fixtures: Playwright (sync API) driving Debian's headless Chromium against
pytest-django's live server, with real Celery workers from `start_worker` (tests/conftest.py).

Playwright's own browser downloads are never used: the `chromium` Debian package is launched by path
(CI installs it in .ci/run; on a developer machine: `apt-get install chromium`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
TIMEOUT_MS = 20_000  # one user-visible step (a page load, an HTMX swap)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail(
            "The browser end-to-end tests need Chromium: `apt-get install chromium` (Debian's package; "
            "`playwright install` is not used). CI installs it in .ci/run.",
            pytrace=False,
        )
    return path


@pytest.fixture
def browser(monkeypatch):
    """A headless Chromium for one test. Playwright's sync API keeps an event loop in this thread, so
    Django's ORM calls made by the test itself need DJANGO_ALLOW_ASYNC_UNSAFE (the live server answers
    from its own thread and is unaffected)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            'Playwright is missing: `pip install -e ".[dev]"` (or `make install-dev`).', pytrace=False
        )
    executable = chromium_path()
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            browser.close()
            # the ORM connections this test opened while Playwright's loop was current belong to that
            # context: close them here, or they outlive the test and block dropping the test database
            from django.db import connections

            connections.close_all()


@pytest.fixture
def page(browser, live_server, settings):
    """A fresh browser page (1280×900, English) whose relative URLs go to the live server. Confirmation
    dialogs (`data-confirm`) are accepted, as the user would click OK."""
    settings.SESSION_COOKIE_SECURE = False  # the live server speaks plain HTTP
    settings.CSRF_COOKIE_SECURE = False
    context = browser.new_context(
        base_url=live_server.url, viewport={"width": 1280, "height": 900}, locale="en-US"
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    yield page
    context.close()


@pytest.fixture
def shot():
    """`shot(page, "curator-01-sign-in")` saves docs/screenshots/curator-01-sign-in.png (full page)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True, animations="disabled")
        return path

    return take


@pytest.fixture
def sign_in():
    """`sign_in(page, user)` through the login form (TEST_PASSWORD); `before_submit()` runs with the form
    filled in (a screenshot of the sign-in page)."""
    from conftest import TEST_PASSWORD
    from django.urls import reverse
    from playwright.sync_api import expect

    def go(page, user, before_submit=None) -> None:
        page.goto(reverse("login"))
        page.get_by_label("Username").fill(user.username)
        page.get_by_label("Password").fill(TEST_PASSWORD)
        if before_submit is not None:
            before_submit()
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign in")).to_have_count(0)

    return go
