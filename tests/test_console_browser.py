"""The console in a real browser: headless Debian chromium (playwright) against a real server.
An admin signs in, creates a key and reads it once from the page, uses it with `requests`,
sees its usage chart, rotates it with a grace period, revokes the new one, signs out; a
`data:read` key sees only its own page, mints a token and opens /data with it.

Screenshots of the dashboard and of a key's chart are written to ``test-artifacts/console/``
(git-ignored; ``KEYGATE_ARTIFACTS`` moves it) on every run, to be looked at.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import ROOT, run_cli
from test_browser import CHROMIUM_ARGS, browser, evidence_on_failure  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("KEYGATE_ARTIFACTS", ROOT / "test-artifacts")) / "console"


@pytest.fixture
def server(env: dict[str, str], start_server):  # noqa: ANN001, ANN201
    init = run_cli(env, "init", "--no-admin-key")
    assert init.returncode == 0, init.stderr
    return start_server()


def _key(env: dict[str, str], name: str, *scopes: str) -> dict[str, Any]:
    args = [a for s in scopes for a in ("--scope", s)]
    done = run_cli(env, "create-key", "--name", name, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Any:  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.keygate_errors = errors
    yield page
    if getattr(page, "_keygate_failed", False):
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        (tmp_path / "failure.html").write_text(page.content())
    context.close()


def sign_in(page: Any, url: str, key: str) -> None:
    page.goto(url + "/dashboard")
    assert page.url.endswith("/login")  # the seed's rule
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="My key").wait_for()


def test_an_admin_manages_keys_in_the_browser(page: Any, server, env: dict[str, str]) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    admin = _key(env, "ops admin", "admin")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with evidence_on_failure(page, server):
        sign_in(page, server.url, admin["key"])
        page.get_by_role("link", name="Keys", exact=True).click()
        expect(page.get_by_role("cell", name="ops admin")).to_be_visible()

        # Create a key; read it once from the page.
        page.get_by_role("link", name="Create a key…").click()
        page.get_by_label("Name").fill("billing <b>svc</b>")
        page.get_by_label("secret:read").check()
        page.get_by_label("data:read").check()
        page.get_by_role("button", name="Create key").click()
        new_key = page.locator("#new-key").input_value()
        assert re.fullmatch(r"kg_[0-9A-Za-z]{50}", new_key)
        new_id = new_key[3:15]
        assert page.get_by_role("button", name="Copy").is_visible()  # console.js ran (CSP: 'self')

        # Use it for real: accepted, and refused for a scope it lacks.
        for _ in range(5):
            assert requests.get(server.url + "/secret", headers={"API-Key": new_key}, timeout=5).status_code == 200
        assert requests.get(server.url + "/admin", headers={"API-Key": new_key}, timeout=5).status_code == 403
        # The counts are written behind (every 5 s): the chart shows them once flushed.
        page.get_by_role("link", name="Go to the new key").click()
        deadline = time.monotonic() + 15
        while "accepted: 5" not in page.locator("svg").first.inner_html():
            assert time.monotonic() < deadline, "the usage never reached the chart"
            time.sleep(1)
            page.reload()
        chart = page.locator("figure svg")
        expect(chart).to_be_visible()
        bars = chart.locator("rect.rect")
        assert bars.count() >= 3 * 24  # a bar per series and hour
        assert chart.locator("title", has_text="accepted: 5").count() == 1
        assert chart.locator("title", has_text="refused: scope: 1").count() == 1
        table = page.get_by_role("table").first
        expect(table).to_contain_text("5")
        assert page.get_by_role("heading", name="Key billing <b>svc</b>").is_visible()  # escaped, as text
        page.locator("section[aria-labelledby=usage-heading]").screenshot(path=str(ARTIFACTS / "key-chart.png"))

        # Rotate it with a grace period: a new key, shown once; the old one still works.
        page.get_by_role("link", name="Rotate…").click()
        page.get_by_label(re.compile("Grace period")).select_option("3600")
        page.get_by_role("button", name="Rotate").click()
        rotated = page.locator("#new-key").input_value()
        assert rotated != new_key
        assert requests.get(server.url + "/secret", headers={"API-Key": rotated}, timeout=5).status_code == 200
        assert requests.get(server.url + "/secret", headers={"API-Key": new_key}, timeout=5).status_code == 200
        page.goto(f"{server.url}/dashboard/keys/{new_id}")
        expect(page.locator("dd.state-grace")).to_be_visible()

        # Revoke the new one in the console (confirming first): the API refuses it.
        page.goto(f"{server.url}/dashboard/keys/{rotated[3:15]}")
        page.get_by_role("link", name="Revoke…").click()
        page.get_by_role("button", name="Yes, revoke it").click()
        expect(page.locator("dd.state-revoked")).to_be_visible()
        refused = requests.get(server.url + "/secret", headers={"API-Key": rotated}, timeout=5)
        assert refused.status_code == 401 and refused.json()["code"] == "key_revoked"

        # The audit trail shows who did it.
        page.get_by_role("link", name="Audit trail", exact=True).click()
        expect(page.get_by_role("cell", name=f"console:{admin['id']}").first).to_be_visible()

        page.get_by_role("link", name="My key", exact=True).click()
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/login")
        page.goto(server.url + "/dashboard")
        assert page.url.endswith("/login")
        assert not [e for e in page.keygate_errors if "Content Security Policy" in e], page.keygate_errors


def test_a_data_read_key_sees_itself_and_opens_data_with_a_token(page: Any, server, env: dict[str, str]) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    reader = _key(env, "reader", "data:read")
    with evidence_on_failure(page, server):
        sign_in(page, server.url, reader["key"])
        expect(page.get_by_role("link", name="Keys", exact=True)).to_have_count(0)
        for path in ("/dashboard/keys", "/dashboard/audit", f"/dashboard/keys/{reader['id']}"):
            resp = page.goto(server.url + path)
            assert resp.status == 403, path
            expect(page.get_by_role("alert")).to_contain_text("Insufficient scope")
        page.goto(server.url + "/dashboard")
        page.get_by_label("Lifetime").select_option("900")
        page.get_by_role("button", name="Mint token").click()
        token = page.locator("#token").input_value()
        assert token.startswith(reader["id"] + ".")
        with page.expect_navigation() as nav:
            page.locator("#data-link").click()
        assert nav.value.status == 200
        assert json.loads(page.locator("body").inner_text())["message"] == "Here is your data."
        page.set_viewport_size({"width": 390, "height": 844})  # a phone
        page.goto(server.url + "/dashboard")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"the page scrolls sideways at phone width ({width} px)"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
