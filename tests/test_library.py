"""``keys/`` as a library in a plain Flask app (no Flask-RESTX, no ``api/``), as a new user
would try it: refusals answered out of the box, the app's own scopes and realm, config from
``app.config``, app factories, async views, and overriding how refusals look."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g, request

from conftest import ROOT
from keys import (
    BearerKey,
    ConfigError,
    HeaderKey,
    InvalidRequest,
    KeyAuth,
    KeygateError,
    MemoryKeyStore,
    RateLimited,
    Scopes,
    current_principal,
    issue_key,
    open_store,
)
from keys.auth import CONFIG_KEYS, PRINCIPAL_ENVIRON_KEY
from keys.cache import CachedLookup

PROBLEM = "application/problem+json"


def plain_app(auth: KeyAuth, *, scope: str = "reports:read", **require: Any) -> Flask:
    """A Flask app with one protected view; ``auth`` is set up for it by the caller."""
    app = Flask(__name__)

    @app.get("/reports")
    @auth.require(scope, **require)
    def reports() -> dict[str, Any]:
        return {"for": g.principal.name, "scopes": list(current_principal().scopes)}  # type: ignore[union-attr]

    return app


def problem(resp, status: int, code: str) -> dict[str, Any]:  # noqa: ANN001
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    body = resp.get_json(force=True)
    assert body["status"] == status and body["code"] == code, body
    assert {"type", "title", "detail", "instance"} <= body.keys()
    if status in (401, 403):
        assert resp.headers["Cache-Control"] == "no-store"
    return body


# -- refusals out of the box ---------------------------------------------------------------


def test_the_readme_promise_of_old_a_plain_app_gets_problems_not_500s(store) -> None:  # noqa: ANN001
    """``KeyAuth(app, store=...)`` and ``@auth.require``: no handler written, every refusal
    answered with its status (the issue's first complaint: each was a 500)."""
    app = Flask(__name__)
    auth = KeyAuth(app, store=store)

    @app.get("/reports")
    @auth.require("reports:read")
    def reports() -> dict[str, str]:
        return {"for": g.principal.name}

    reader = issue_key(store, name="reader", scopes=["reports:read"]).plaintext
    other = issue_key(store, name="other", scopes=["reports:write"]).plaintext
    client = app.test_client()

    missing = client.get("/reports")
    problem(missing, 401, "missing_credentials")
    assert missing.headers["WWW-Authenticate"] == "ApiKey"  # no realm chosen: none invented
    junk = client.get("/reports", headers={"API-Key": "kg_junk"})
    problem(junk, 401, "invalid_credentials")
    assert junk.headers["WWW-Authenticate"] == 'ApiKey error="invalid_token"'
    denied = problem(client.get("/reports", headers={"API-Key": other}), 403, "insufficient_scope")
    assert "reports:read" in denied["detail"]
    assert client.get("/reports", headers={"API-Key": reader}).get_json() == {"for": "reader"}


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
def test_an_uninitialised_store_is_a_clear_error_at_start_up(store_url: str) -> None:
    store = open_store(store_url)
    try:
        with pytest.raises(ConfigError) as info:
            KeyAuth(Flask(__name__), store=store)
        assert "migrate()" in info.value.detail
        store.migrate()  # the one way to create the schema; then the app starts
        app = Flask(__name__)
        KeyAuth(app, store=store)
        assert app.extensions["keygate"].store is store
    finally:
        store.close()


def test_a_store_unreachable_at_start_up_answers_503_until_it_is_back() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test")
    try:
        auth = KeyAuth(store=store)
        app = plain_app(auth)
        auth.init_app(app)
        resp = app.test_client().get("/reports", headers={"API-Key": issue_key(
            MemoryKeyStore(), name="x", scopes=["reports:read"]).plaintext})
        problem(resp, 503, "store_unavailable")
        assert resp.headers["Retry-After"] == "5"
    finally:
        store.close()


# -- the app's scopes -------------------------------------------------------------------------


def test_the_app_chooses_its_scopes_and_its_superscope() -> None:
    store = MemoryKeyStore()
    auth = KeyAuth(store=store, scopes=["reports:read", "reports:write", "boss"], superscope="boss")
    app = plain_app(auth, scope="reports:write")
    auth.init_app(app)
    boss = issue_key(store, name="boss", scopes=["boss"], vocabulary=auth.scopes).plaintext
    reader = issue_key(store, name="r", scopes=["reports:read"], vocabulary=auth.scopes).plaintext
    client = app.test_client()
    assert client.get("/reports", headers={"API-Key": boss}).status_code == 200
    problem(client.get("/reports", headers={"API-Key": reader}), 403, "insufficient_scope")
    with pytest.raises(InvalidRequest, match="known scopes: reports:read, reports:write, boss"):
        issue_key(store, name="typo", scopes=["report:read"], vocabulary=auth.scopes)
    with pytest.raises(ValueError, match="unknown scope"):
        auth.require("reports:delete")  # a typo in a decorator fails at import, not per request


def test_no_scope_is_special_unless_the_app_says_so() -> None:
    """``admin`` was hard-wired as the superscope; now it is only the service's choice."""
    store = MemoryKeyStore()
    auth = KeyAuth(store=store)
    app = plain_app(auth)
    auth.init_app(app)
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    problem(app.test_client().get("/reports", headers={"API-Key": admin}), 403, "insufficient_scope")


@pytest.mark.parametrize("scopes", [[""], ["two words"], ['quo"te'], ["back\\slash"], ["x" * 101], [None], []])
def test_without_a_vocabulary_any_well_formed_scope_is_accepted_and_nothing_else(scopes) -> None:  # noqa: ANN001
    store = MemoryKeyStore()
    assert issue_key(store, name="ok", scopes=["reports:read", "x" * 100]).record.scopes == ("reports:read", "x" * 100)
    with pytest.raises(InvalidRequest):
        issue_key(store, name="bad", scopes=scopes)
    assert store.count() == 1


def test_scopes_reject_a_superscope_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError):
        Scopes(["a", "b"], superscope="c")
    with pytest.raises(ValueError):
        Scopes(["has space"])


# -- credential sources and their challenges ---------------------------------------------------


def bearer_app(realm: str | None = "reports") -> tuple[Flask, MemoryKeyStore, KeyAuth]:
    store = MemoryKeyStore()
    auth = KeyAuth(store=store, sources=[BearerKey(), HeaderKey()], realm=realm)
    app = plain_app(auth)
    auth.init_app(app)
    return app, store, auth


@pytest.mark.parametrize("header", ["Bearer {k}", "bearer {k}", "BEARER   {k}  ", "  Bearer {k}"])
def test_a_bearer_key(header: str) -> None:
    app, store, _ = bearer_app()
    key = issue_key(store, name="b", scopes=["reports:read"]).plaintext
    resp = app.test_client().get("/reports", headers={"Authorization": header.format(k=key)})
    assert resp.status_code == 200 and resp.get_json()["for"] == "b"


def test_the_challenge_belongs_to_the_source() -> None:
    app, store, _ = bearer_app()
    client = app.test_client()
    # Nothing sent: every accepted source's challenge, in the order the app gave them.
    missing = client.get("/reports")
    problem(missing, 401, "missing_credentials")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="reports", ApiKey realm="reports"'
    # Another scheme is no bearer credential: still missing.
    basic = client.get("/reports", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.headers["WWW-Authenticate"] == missing.headers["WWW-Authenticate"]
    # Refused: the refusing source's challenge, with RFC 6750's error.
    for headers, challenge in [
        ({"Authorization": "Bearer kg_junk"}, 'Bearer realm="reports", error="invalid_token"'),
        ({"Authorization": "Bearer"}, 'Bearer realm="reports", error="invalid_token"'),
        ({"API-Key": "kg_junk"}, 'ApiKey realm="reports", error="invalid_token"'),
    ]:
        resp = client.get("/reports", headers=headers)
        problem(resp, 401, "invalid_credentials")
        assert resp.headers["WWW-Authenticate"] == challenge
    key = issue_key(store, name="b", scopes=["reports:read"]).plaintext
    both = client.get("/reports", headers={"Authorization": f"Bearer {key}", "API-Key": key})
    problem(both, 400, "multiple_credentials")


def test_a_key_in_a_header_the_app_does_not_read_gets_a_hint_naming_the_right_one() -> None:
    """By default ``Authorization`` and ``X-API-Key`` are looked at, only when nothing was sent
    where the app reads; the detail names the header, never the value. The app may list others
    or none."""
    store = MemoryKeyStore()
    key = issue_key(store, name="b", scopes=["reports:read"]).plaintext
    auth = KeyAuth(store=store, sources=[HeaderKey("X-Token", scheme="Token")])
    app = plain_app(auth)
    auth.init_app(app)
    detail = problem(app.test_client().get("/reports", headers={"Authorization": f"Bearer {key}"}),
                     401, "missing_credentials")["detail"]
    assert detail == ("Send a credential in the X-Token header: a key was sent in the Authorization "
                      "header, which is not read here.")
    own = KeyAuth(store=store, sources=[HeaderKey("X-Token")], misplaced_key_headers=["X-Key"])
    quiet = KeyAuth(store=store, sources=[HeaderKey("X-Token")], misplaced_key_headers=())
    for ext, headers, hinted in [(own, {"X-Key": key}, True), (own, {"X-API-Key": key}, False),
                                 (quiet, {"Authorization": f"Bearer {key}"}, False)]:
        app = plain_app(ext)
        ext.init_app(app)
        body = problem(app.test_client().get("/reports", headers=headers), 401, "missing_credentials")
        assert ("which is not read here" in body["detail"]) == hinted, body
        assert key[3:] not in body["detail"]


def test_a_source_may_set_its_own_realm_and_scheme() -> None:
    store = MemoryKeyStore()
    auth = KeyAuth(store=store, sources=[HeaderKey("X-Token", scheme="Token", realm="own")], realm="app")
    app = plain_app(auth)
    auth.init_app(app)
    assert app.test_client().get("/reports").headers["WWW-Authenticate"] == 'Token realm="own"'


@pytest.mark.parametrize("realm", ["two\r\nlines", "nul\x00", "ünï", "", 7])
def test_a_realm_that_could_break_the_header_is_refused(realm) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError):
        KeyAuth(store=MemoryKeyStore(), realm=realm)
    app = Flask(__name__)
    app.config["KEYGATE_REALM"] = realm
    with pytest.raises(ConfigError):
        KeyAuth(app, store=MemoryKeyStore())


def test_a_realm_with_quotes_is_quoted() -> None:
    app, _, _ = bearer_app(realm='say "hi" \\o/')
    assert app.test_client().get("/reports").headers["WWW-Authenticate"].startswith(
        'Bearer realm="say \\"hi\\" \\\\o/"')


def test_sources_are_checked_when_configured() -> None:
    with pytest.raises(ValueError):
        KeyAuth(store=MemoryKeyStore(), sources=[HeaderKey(), HeaderKey("X-Other")])  # two of a kind
    auth = KeyAuth(store=MemoryKeyStore())
    with pytest.raises(ValueError):
        auth.require("x", accept="header")  # a string, not a list of kinds
    with pytest.raises(ConfigError):
        HeaderKey("Bad Header")


# -- configuration through app.config -------------------------------------------------------


def test_configuration_from_app_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    open_store(url).migrate()
    app = Flask(__name__)
    app.config.update(KEYGATE_DATABASE_URL=url, KEYGATE_SCOPES="reports:read, reports:write boss",
                      KEYGATE_SUPERSCOPE="boss", KEYGATE_REALM="from-config")
    auth = KeyAuth()

    @app.get("/reports")
    @auth.require("reports:write")
    def reports() -> str:
        return "ok"

    auth.init_app(app)
    state = app.extensions["keygate"]
    assert state.scopes.names == ("reports:read", "reports:write", "boss") and state.scopes.superscope == "boss"
    boss = issue_key(state.store, name="b", scopes=["boss"], vocabulary=state.scopes).plaintext
    client = app.test_client()
    assert client.get("/reports").headers["WWW-Authenticate"] == 'ApiKey realm="from-config"'
    assert client.get("/reports", headers={"API-Key": boss}).status_code == 200
    state.store.close()


def test_constructor_arguments_win_over_app_config() -> None:
    app = Flask(__name__)
    app.config.update(KEYGATE_DATABASE_URL="mysql://not-used", KEYGATE_SCOPES="a b",
                      KEYGATE_SUPERSCOPE="b", KEYGATE_REALM="config")
    store = MemoryKeyStore()
    KeyAuth(app, store=store, scopes=["x", "y"], superscope="y", realm="argument")
    state = app.extensions["keygate"]
    assert state.store is store and state.scopes.names == ("x", "y") and state.realm == "argument"


@pytest.mark.parametrize(("config", "names"), [
    ({}, "KeyAuth needs a key store"),
    ({"KEYGATE_DATABASE_URL": "mysql://x"}, "KEYGATE_DATABASE_URL"),
    ({"KEYGATE_DATABASE_URL": "sqlite"}, "KEYGATE_DATABASE_URL"),
    ({"KEYGATE_SCOPES": ["a", "b"], "KEYGATE_SUPERSCOPE": "c"}, "superscope"),
    ({"KEYGATE_SCOPES": 5}, "KEYGATE_SCOPES"),
    ({"KEYGATE_SCOPES": ["ok", "not ok"]}, "KEYGATE_SCOPES"),
    ({"KEYGATE_SUPERSCOPE": 5}, "KEYGATE_SUPERSCOPE"),
])
def test_bad_configuration_is_one_clear_error(config: dict[str, Any], names: str) -> None:
    app = Flask(__name__)
    app.config.update({"KEYGATE_DATABASE_URL": "memory://", **config})
    if not config:
        del app.config["KEYGATE_DATABASE_URL"]
    with pytest.raises(ConfigError) as info:
        KeyAuth(app)
    assert names in str(info.value) and "\n" not in str(info.value)


def test_careless_scopes_are_refused() -> None:
    store = MemoryKeyStore()
    with pytest.raises(InvalidRequest, match="not one string"):
        issue_key(store, name="x", scopes="reports:read")  # not the scopes r, e, p, o, …
    auth = KeyAuth(store=store)
    with pytest.raises(ValueError):
        auth.require("two words")  # can never be held
    assert store.count() == 0


# -- app factories: state per app --------------------------------------------------------------


def test_one_extension_many_apps_each_with_its_own_store() -> None:
    auth = KeyAuth(scopes=["reports:read"])
    first_store, second_store = MemoryKeyStore(), MemoryKeyStore()
    first, second = plain_app(auth), plain_app(auth)
    auth.init_app(first, first_store)
    auth.init_app(second, second_store, lookup=CachedLookup(second_store))
    first_key = issue_key(first_store, name="one", scopes=["reports:read"]).plaintext
    second_key = issue_key(second_store, name="two", scopes=["reports:read"]).plaintext
    assert first.test_client().get("/reports", headers={"API-Key": first_key}).status_code == 200
    assert second.test_client().get("/reports", headers={"API-Key": second_key}).status_code == 200
    problem(first.test_client().get("/reports", headers={"API-Key": second_key}), 401, "invalid_credentials")
    problem(second.test_client().get("/reports", headers={"API-Key": first_key}), 401, "invalid_credentials")
    with first.app_context():
        assert auth.store is first_store and auth.lookup is first_store
    with second.app_context():
        assert auth.store is second_store and isinstance(auth.lookup, CachedLookup)


def test_a_second_init_app_does_not_keep_the_first_stores_lookup() -> None:
    first_store, second_store = MemoryKeyStore(), MemoryKeyStore()
    auth = KeyAuth(store=first_store, lookup=CachedLookup(first_store))
    app = plain_app(auth)
    auth.init_app(app, second_store)
    key = issue_key(second_store, name="two", scopes=["reports:read"]).plaintext
    assert app.test_client().get("/reports", headers={"API-Key": key}).status_code == 200
    assert app.extensions["keygate"].lookup is second_store


def test_an_app_that_was_never_set_up_is_told_so() -> None:
    auth = KeyAuth(store=MemoryKeyStore())
    app = plain_app(auth)
    app.testing = True
    with pytest.raises(RuntimeError, match="init_app"):
        app.test_client().get("/reports")


# -- async views ---------------------------------------------------------------------------


def test_an_async_view_is_protected_and_runs() -> None:
    store = MemoryKeyStore()
    app = Flask(__name__)
    auth = KeyAuth(app, store=store)

    @app.get("/slow")
    @auth.require("reports:read")
    async def slow() -> dict[str, str]:
        import asyncio

        await asyncio.sleep(0)
        return {"for": g.principal.name}

    key = issue_key(store, name="async", scopes=["reports:read"]).plaintext
    client = app.test_client()
    assert client.get("/slow", headers={"API-Key": key}).get_json() == {"for": "async"}
    problem(client.get("/slow"), 401, "missing_credentials")


# -- refused requests leave no principal behind -----------------------------------------------


def test_refused_requests_leave_no_principal_behind() -> None:
    store = MemoryKeyStore()
    auth = KeyAuth(store=store)
    app = plain_app(auth)
    auth.init_app(app)
    seen: list[tuple[int, Any, Any]] = []

    @app.after_request
    def record(resp):  # noqa: ANN001, ANN202
        seen.append((resp.status_code, g.get("principal"), request.environ.get(PRINCIPAL_ENVIRON_KEY)))
        return resp

    @auth.after_authentication
    def throttle(principal) -> None:  # noqa: ANN001
        if principal.name == "throttled":
            raise RateLimited("slow down", retry_after=3)

    reader = issue_key(store, name="reader", scopes=["reports:read"]).plaintext
    writer = issue_key(store, name="writer", scopes=["reports:write"]).plaintext
    throttled = issue_key(store, name="throttled", scopes=["reports:read"]).plaintext
    fenced = issue_key(store, name="fenced", scopes=["reports:read"], allowed_ips=["10.0.0.0/8"]).plaintext
    client = app.test_client()
    for key, status in [(writer, 403), (throttled, 429), (fenced, 403), ("kg_junk", 401)]:
        assert client.get("/reports", headers={"API-Key": key}).status_code == status
        assert seen.pop() == (status, None, None)
    assert client.get("/reports", headers={"API-Key": reader}).status_code == 200
    status, principal, in_environ = seen.pop()
    assert status == 200 and principal.name == "reader" and in_environ is principal


# -- how refusals look: the app's choice -------------------------------------------------------


def test_the_app_can_render_refusals_itself() -> None:
    app, store, auth = bearer_app()

    @auth.error_handler
    def render(error: KeygateError) -> tuple[str, int]:
        return f"no: {error.code}", error.status

    resp = app.test_client().get("/reports", headers={"API-Key": "kg_junk"})
    assert (resp.status_code, resp.get_data(as_text=True)) == (401, "no: invalid_credentials")
    # The challenge is still there: a 401 without one would break clients.
    assert resp.headers["WWW-Authenticate"] == 'ApiKey realm="reports", error="invalid_token"'


def test_an_async_error_handler_and_one_that_sets_its_own_headers() -> None:
    app, _, auth = bearer_app()

    @auth.error_handler
    async def render(error: KeygateError) -> tuple[dict[str, str], int, dict[str, str]]:
        return {"error": error.code}, error.status, {"WWW-Authenticate": 'Bearer realm="mine"'}

    resp = app.test_client().get("/reports")
    assert resp.get_json() == {"error": "missing_credentials"}
    assert resp.headers.getlist("WWW-Authenticate") == ['Bearer realm="mine"']


def test_an_app_handler_registered_first_is_kept() -> None:
    app = Flask(__name__)

    @app.errorhandler(KeygateError)
    def mine(error: KeygateError) -> tuple[str, int]:
        return "mine", error.status

    auth = KeyAuth(app, store=MemoryKeyStore())

    @app.get("/x")
    @auth.require("s")
    def x() -> str:
        return "x"

    assert app.test_client().get("/x").get_data(as_text=True) == "mine"


# -- what keys/ must not know ------------------------------------------------------------------


def _library_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / "keys").rglob("*.py"))}


def test_keys_reads_no_environment_variable() -> None:
    for path, text in _library_sources().items():
        assert not re.search(r"os\.environ|getenv", text), path


def test_keys_names_no_variable_route_or_command_of_the_service() -> None:
    service_routes = r"/tokens|/admin|/secret|/data\b|/healthz|/readyz|/metrics|manage\.py|make run"
    for path, text in _library_sources().items():
        named = set(re.findall(r"KEYGATE_[A-Z_]+", text))
        assert named <= set(CONFIG_KEYS), (path, named - set(CONFIG_KEYS))
        assert not re.search(service_routes, text), (path, re.search(service_routes, text))
        assert "secret:read" not in text and "data:read" not in text, path
