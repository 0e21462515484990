"""The Swagger UI at /docs, in a real browser: headless Debian chromium driven by playwright,
against a real server. Authorize with a key, execute GET /secret, read the answer on the page;
without a key, read the 401 problem; expand its 401 and 403 responses and read one correct
example per error code. A failing test leaves a screenshot (and the page's HTML)
in its tmp dir.

Chromium comes from Debian (``apt-get install chromium``; .ci/run does it), never from
``playwright install``. Without it the tests skip, unless KEYGATE_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conftest import REQUIRE_SERVICES, invoke_cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} and KEYGATE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def server(env: dict[str, str], start_server):  # noqa: ANN001, ANN201
    init = invoke_cli(env, "init", "--no-admin-key")
    assert init.returncode == 0, init.stderr
    return start_server()


@pytest.fixture
def page(browser: Any, tmp_path: Path, server) -> Iterator[Any]:  # noqa: ANN001
    """A fresh browser page; if the test failed on it, its screenshot and HTML go to tmp_path."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        yield page
        if getattr(page, "_keygate_failed", False):  # set by evidence_on_failure
            _save_evidence(page, tmp_path)
    finally:
        context.close()


def _save_evidence(page: Any, tmp_path: Path) -> None:
    try:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        (tmp_path / "failure.html").write_text(page.content())
    except Exception as e:  # noqa: BLE001 (evidence is best effort; the failure itself is reported)
        print(f"could not save a screenshot: {e}")
    print(f"screenshot and page HTML saved under {tmp_path}")


@contextmanager
def evidence_on_failure(page: Any, server) -> Iterator[None]:  # noqa: ANN001
    """Marks the page failed (so the fixture saves a screenshot) and adds the server's log."""
    try:
        yield
    except BaseException as e:
        page._keygate_failed = True
        e.add_note(f"server output:\n{server.output()[-3000:]}")
        raise


def open_docs(page: Any, url: str) -> None:
    page.goto(url + "/docs")
    page.get_by_role("button", name="Authorize").wait_for()


def execute_get_secret(page: Any) -> tuple[str, dict[str, Any]]:
    """Try it out → Execute on GET /secret; (status, body) as the page shows them."""
    page.locator("#operations-tag-pages").click()
    op = page.locator("#operations-pages-getSecret")
    op.locator(".opblock-summary").click()
    op.get_by_role("button", name="Try it out").click()
    op.get_by_role("button", name="Execute").click()
    row = op.locator(".live-responses-table tr.response")
    status = row.locator("td.response-col_status").inner_text().strip()
    body = row.locator(".response-col_description pre").first.inner_text()
    return status, json.loads(body)


def test_authorize_with_a_key_then_get_secret(page: Any, server, env: dict[str, str]) -> None:  # noqa: ANN001
    created = invoke_cli(env, "create-key", "--name", "browser", "--scope", "secret:read", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]
    with evidence_on_failure(page, server):
        # A newcomer types the server's address: / redirects to the Swagger UI.
        page.goto(server.url + "/")
        page.get_by_role("button", name="Authorize").wait_for()
        assert page.url == server.url + "/docs"
        page.get_by_role("button", name="Authorize").click()
        dialog = page.locator(".modal-ux")
        # The dialog offers both credentials of the contract: the header and the query token,
        # and says not to authorise both (every request would be refused as ambiguous).
        header_box = dialog.locator(".auth-container").filter(has_text="Name: API-Key")
        token_box = dialog.locator(".auth-container").filter(has_text="Name: token")
        assert "In: header" in header_box.inner_text()
        assert "In: query" in token_box.inner_text()
        for box in (header_box, token_box):
            assert "multiple_credentials" in box.inner_text(), box.inner_text()
        header_box.locator("input").fill(key)
        header_box.get_by_role("button", name="Authorize").click()
        header_box.get_by_role("button", name="Logout").wait_for()  # Swagger UI's "authorized" state
        header_box.get_by_role("button", name="Close").click()

        status, body = execute_get_secret(page)
        assert status == "200", body
        assert body["message"] == "Welcome to the secret page!"
        assert body["caller"]["name"] == "browser" and body["caller"]["via"] == "header"


def test_without_a_key_the_page_shows_the_401_problem(page: Any, server) -> None:  # noqa: ANN001
    with evidence_on_failure(page, server):
        open_docs(page, server.url)
        status, body = execute_get_secret(page)
        assert status == "401", body
        assert body["code"] == "missing_credentials"
        assert body["status"] == 401 and body["instance"] == "/secret"
        shown = page.locator("#operations-pages-getSecret .live-responses-table").inner_text()
        assert 'www-authenticate: ApiKey realm="keygate"' in shown, shown


def test_the_docs_show_a_correct_example_for_each_error_code(page: Any, server) -> None:  # noqa: ANN001
    """GET /secret's 401 and 403, expanded: Swagger UI offers one example per code the contract
    gives that status, and each shows that code, with the type and title the server sends."""
    from playwright.sync_api import expect

    from keys.exc import error_for_code

    contract = {
        "401": {"missing_credentials", "invalid_credentials", "key_revoked", "key_expired",
                "invalid_token", "token_expired"},
        "403": {"insufficient_scope", "ip_not_allowed"},
    }
    with evidence_on_failure(page, server):
        open_docs(page, server.url)
        page.locator("#operations-tag-pages").click()
        op = page.locator("#operations-pages-getSecret")
        op.locator(".opblock-summary").click()
        for status, codes in contract.items():
            row = op.locator(f"tr.response[data-code='{status}']")
            choice = row.locator("select.examples-select-element")
            offered = choice.locator("option").evaluate_all("options => options.map(o => o.value)")
            assert sorted(offered) == sorted(codes), (status, offered)
            shown_example = row.locator(".model-example pre").first
            for code in offered:
                choice.select_option(code)
                expect(shown_example).to_contain_text(f'"code": "{code}"')
                shown = json.loads(shown_example.inner_text())
                assert shown["type"] == f"tag:keygate,2026:problem/{code}", shown
                assert shown["title"] == error_for_code(code).title, shown
                assert shown["status"] == int(status), shown


def test_evidence_is_saved_on_failure(browser: Any, tmp_path: Path) -> None:
    """The screenshot-on-failure path itself works (a broken one would hide every failure)."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_content("<h1>keygate</h1>")
        _save_evidence(page, tmp_path)
    finally:
        context.close()
    assert (tmp_path / "failure.png").stat().st_size > 0
    assert "keygate" in (tmp_path / "failure.html").read_text()


def test_the_docs_run_under_their_content_security_policy(page: Any, server) -> None:  # noqa: ANN001
    """/docs carries a CSP that allows only its own scripts (issue 12), and Swagger UI still
    renders, loads the document and executes a request without a single violation."""
    violations: list[str] = []
    page.on("console", lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.on("pageerror", lambda error: violations.append(str(error)))
    with evidence_on_failure(page, server):
        response = page.goto(server.url + "/docs")
        csp = response.headers["content-security-policy"]
        script_src = csp.split("script-src")[1].split(";")[0]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in script_src
        assert response.headers["x-frame-options"] == "DENY"
        page.get_by_role("button", name="Authorize").wait_for()
        status, body = execute_get_secret(page)
        assert status == "401" and body["code"] == "missing_credentials"
        assert violations == []
        # The policy is really enforced: a script injected into the page does not run.
        ran = page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'window.injected = true'; document.body.appendChild(s); return !!window.injected; }""")
        assert ran is False
