"""The portal in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's async API on
the session event loop, where the services also run), against the whole stack reached through the
proxy's real port. Screenshots go to test-artifacts/portal/."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.devtoken import make_token
from tests.portal.stack import Stack, stack_fixture
from tests.support.servers import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "portal"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.access(CHROMIUM, os.X_OK):
        return
    skip = pytest.mark.skip(
        reason=f"{CHROMIUM} not found: install Debian's chromium (`make browser`) to run the portal tests"
    )
    for item in items:
        if "tests/portal/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(skip)


stack = stack_fixture("portal", fixture="stack")


@pytest.fixture(scope="package")
async def browser():  # type: ignore[no-untyped-def]
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser):  # type: ignore[no-untyped-def]
    """A desktop-sized page in a fresh context (own sessionStorage); console errors fail the test."""
    context = await browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(15_000)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    await context.close()
    assert not errors, f"JavaScript errors in the portal: {errors}"


@pytest.fixture
def new_user() -> Callable[[], str]:
    return lambda: f"portal-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sign_in_url(stack: Stack) -> Callable[..., str]:
    """sign_in_url(user_id, tab=None) → the portal URL on the proxy's real port that signs the user in."""

    def make(user_id: str, tab: str | None = None) -> str:
        fragment = f"token={make_token(user_id, secret=stack.proxy.settings.user_token_secret)}"
        return f"{stack.proxy.url}/#{fragment}" + (f"&{tab}" if tab else "")

    return make


@pytest.fixture
def shoot() -> Callable[..., object]:
    """await shoot(page, "name"): saves test-artifacts/portal/<name>-<width>.png (full page)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    async def capture(page, name: str) -> Path:  # type: ignore[no-untyped-def]
        width = page.viewport_size["width"] if page.viewport_size else 0
        path = ARTIFACTS / f"{name}-{width}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path

    return capture
