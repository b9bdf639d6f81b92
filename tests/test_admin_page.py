"""The administrators' page (/admin) in a real Chromium against a real ``zhiyi serve``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from page_helpers import REPO, ZhiyiServer, add_user, api, base_env

CHROMIUM = Path("/usr/bin/chromium")
if not os.environ.get("CI"):  # on CI a missing browser fails the tests instead
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium",
                    allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update"]
SCREENSHOTS = REPO / "test-results" / "screenshots"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ZhiyiServer]:
    zhiyi = ZhiyiServer(tmp_path / "data").start()
    yield zhiyi
    zhiyi.stop()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(locale="en-US", viewport={"width": 1100, "height": 900})
        context.set_default_timeout(30_000)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text)
                if message.type == "error" and "Content Security Policy" in message.text
                else None)
        yield page
        browser.close()
        assert not errors, f"errors in the page: {errors}"


def make_admin(server: ZhiyiServer, name: str) -> None:
    subprocess.run([sys.executable, "-m", "zhiyi_server", "user", "admin", name,
                    "--data", str(server.data_dir)], env=base_env(), cwd=REPO, check=True,
                   capture_output=True, timeout=60)


def test_an_administrator_grants_creates_and_revokes(server: ZhiyiServer, page: Page) -> None:
    make_admin(server, "local")
    bob = add_user(server.data_dir, "bob", 10)
    page.goto(f"{server.url}/?token={server.local_token}")  # the session cookie
    page.goto(f"{server.url}/admin")
    bob_row = page.locator('#users tr[data-user="bob"]')
    expect(bob_row.locator(".credits")).to_have_text("10")
    expect(page.locator('#users tr[data-user="local"]')).to_contain_text("administrator")
    expect(page.locator('#engines li[data-engine="pseudo"]')).to_have_text("pseudo: available")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "admin-page.png", full_page=True)

    bob_row.get_by_label("Credits to grant bob").fill("5")
    bob_row.get_by_role("button", name="Grant").click()
    expect(bob_row.locator(".credits")).to_have_text("15")
    assert api(server.url, bob, "GET", "api/me")[1]["credits"] == 15

    page.get_by_label("Name").fill("carol")
    page.get_by_label("Credits", exact=True).fill("3")
    page.get_by_role("button", name="Create").click()
    link = page.locator("#new-user-link")
    expect(page.locator("#new-user-result")).to_be_visible()
    token = link.input_value().split("token=", 1)[1]
    assert api(server.url, token, "GET", "api/me")[1] == {
        "success": True, "userId": "carol", "credits": 3}
    expect(page.locator('#users tr[data-user="carol"] .credits')).to_have_text("3")

    bob_row.get_by_role("button", name="Revoke every token and session of bob").click()
    expect(bob_row.get_by_role("button", name="Revoke every token and session of bob")
           ).to_have_text("Revoked 1")
    assert api(server.url, bob, "GET", "api/me")[0] == 401
    page.screenshot(path=SCREENSHOTS / "admin-page-after.png", full_page=True)


def test_a_user_who_is_not_an_administrator_is_told_so(server: ZhiyiServer, page: Page) -> None:
    page.goto(f"{server.url}/?token={server.local_token}")
    page.goto(f"{server.url}/admin")
    expect(page.get_by_role("alert")).to_contain_text("zhiyi user admin NAME")
    expect(page.locator("#users tbody tr")).to_have_count(0)
