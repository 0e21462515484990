"""The console over HTTP (Flask's test client; real servers at the end): sessions, CSRF,
cookies, headers, escaping, errors, and what each kind of key may do there."""

from __future__ import annotations

import re
import time
from http.cookies import SimpleCookie
from typing import Any

import pytest

from keys import issue_key
from keys.sessions import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT

CONSOLE_HEADERS = {
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
XSS = "<script>alert(1)</script>"


def assert_console_headers(resp: Any) -> None:
    for name, value in CONSOLE_HEADERS.items():
        assert resp.headers.get(name) == value, (resp.request.path, name, resp.headers.get(name))
    csp = resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


class Console:
    """A browser's view of the console through a test client: it keeps cookies, and posts
    forms with the CSRF token of the page they came from."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, path: str, **kw: Any) -> Any:
        resp = self.client.get(path, **kw)
        assert_console_headers(resp)
        return resp

    def token(self, path: str) -> str:
        page = self.get(path)
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
        assert found, (path, page.status_code)
        return found.group(1)

    def post(self, path: str, data: dict[str, Any] | None = None, *, form_from: str | None = None,
             csrf: str | None = None, **kw: Any) -> Any:
        data = dict(data or {})
        data.setdefault("csrf_token", csrf if csrf is not None else self.token(form_from or path))
        resp = self.client.post(path, data=data, **kw)
        assert_console_headers(resp)
        return resp

    def sign_in(self, plaintext: str) -> Any:
        return self.post("/login", {"api_key": plaintext})

    def session_cookie(self) -> str | None:
        for name in ("keygate_session", "__Host-keygate_session"):
            cookie = self.client.get_cookie(name)
            if cookie is not None:
                return cookie.value
        return None


@pytest.fixture
def console(client) -> Console:  # noqa: ANN001
    return Console(client)


@pytest.fixture
def reader(store):  # noqa: ANN001, ANN201
    return issue_key(store, name="reader", scopes=["data:read"])


# -- sessions ------------------------------------------------------------------------


def test_the_seed_rule_dashboard_without_a_session_is_303_to_login(console):
    resp = console.get("/dashboard")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    for path in ("/dashboard/keys", "/dashboard/audit", "/dashboard/keys/new", "/dashboard/rotate"):
        assert console.get(path).status_code == 303


def test_sign_in_then_out(console, admin, store):
    assert console.get("/login").status_code == 200
    resp = console.sign_in(admin.plaintext)
    assert resp.status_code == 303 and resp.headers["Location"] == "/dashboard"
    page = console.get("/dashboard")
    assert page.status_code == 200 and admin.record.id in page.get_data(as_text=True)
    assert console.get("/login").headers["Location"] == "/dashboard"  # already signed in
    resp = console.post("/logout", form_from="/dashboard")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert console.get("/dashboard").status_code == 303
    events = [(e.event, e.actor) for e in store.events(key_id=admin.record.id)]
    assert ("console_login", f"console:{admin.record.id}") in events
    assert ("console_logout", f"console:{admin.record.id}") in events


def test_the_cookie_holds_a_signed_reference_and_the_store_only_its_hash(console, admin, store):
    import hashlib

    from itsdangerous import URLSafeSerializer

    console.sign_in(admin.plaintext)
    value = console.session_cookie()
    assert value and admin.plaintext not in value and admin.record.id not in value and "admin" not in value
    [session] = _sessions(store, admin.record.id)
    session_id = URLSafeSerializer(["x"]).load_payload(value.rsplit(".", 1)[0].encode())  # unsigned read
    assert session.id_hash == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in repr(session)


def test_a_cookie_copied_before_logout_is_refused_after_it(console, client, admin, app):
    console.sign_in(admin.plaintext)
    stolen = console.session_cookie()
    console.post("/logout", form_from="/dashboard")
    thief = app.test_client()
    thief.set_cookie("keygate_session", stolen)
    resp = thief.get("/dashboard")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"


def test_a_forged_or_tampered_cookie_is_no_session(app, console, admin):
    console.sign_in(admin.plaintext)
    real = console.session_cookie()
    for forged in ("x", real[:-2] + "AA", real.split(".")[0], "eyJzIjoxfQ.AAAA"):
        c = app.test_client()
        c.set_cookie("keygate_session", forged)
        assert c.get("/dashboard").status_code == 303


def test_sign_in_always_makes_a_new_session_id_fixation_impossible(app, admin, store):
    """An attacker who plants a session cookie (their own, valid one) gets nothing: signing in
    replaces it with a new id, and the planted one stays the attacker's."""
    attacker = Console(app.test_client())
    attacker.sign_in(issue_key(store, name="attacker", scopes=["data:read"]).plaintext)
    planted = attacker.session_cookie()
    victim = Console(app.test_client())
    victim.client.set_cookie("keygate_session", planted)
    assert "attacker" in victim.get("/dashboard").get_data(as_text=True)
    victim.post("/login", {"api_key": admin.plaintext}, form_from="/dashboard")
    assert victim.session_cookie() != planted
    assert "attacker" in attacker.get("/dashboard").get_data(as_text=True)
    assert "Keys" in victim.get("/dashboard").get_data(as_text=True)
    again = Console(app.test_client())
    again.sign_in(admin.plaintext)
    assert again.session_cookie() != victim.session_cookie()  # every sign-in, a new id


def test_cookie_flags_over_plain_http(console, admin):
    resp = console.sign_in(admin.plaintext)
    [cookie] = [c for c in resp.headers.getlist("Set-Cookie") if c.startswith("keygate_session=")]
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path"} <= flags and "secure" not in flags
    assert "SameSite=Lax" in cookie and "Domain" not in cookie


@pytest.mark.parametrize("how", ["https", "trusted proxy"])
def test_cookie_flags_under_https_secure_and_host_prefixed(store, make_app, admin, how):
    if how == "https":
        app = make_app(store)
        client = app.test_client()
        kw: dict[str, Any] = {"base_url": "https://console.example"}
    else:
        app = make_app(store, TRUSTED_PROXIES="1")
        client = app.test_client()
        kw = {"headers": {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}}
    page = client.get("/login", **kw)
    assert "__Host-keygate_signin=" in page.headers["Set-Cookie"] and "Secure" in page.headers["Set-Cookie"]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    resp = client.post("/login", data={"api_key": admin.plaintext, "csrf_token": csrf}, **kw)
    assert resp.status_code == 303, resp.get_data(as_text=True)
    [cookie] = [c for c in resp.headers.getlist("Set-Cookie") if c.startswith("__Host-keygate_session=")]
    parsed = SimpleCookie(cookie)["__Host-keygate_session"]
    assert parsed["secure"] and parsed["httponly"] and parsed["path"] == "/" and not parsed["domain"]
    assert parsed["samesite"] == "Lax"
    assert client.get("/dashboard", **kw).status_code == 200
    # The same cookie over plain HTTP is not the console's (its name says HTTPS only).
    assert client.get("/dashboard").status_code == 303


def test_idle_and_absolute_timeouts_end_sessions(console, admin, store, app):
    console.sign_in(admin.plaintext)
    [session] = _sessions(store, admin.record.id)
    _age(store, session, last_seen=IDLE_TIMEOUT + 5)
    assert console.get("/dashboard").status_code == 303
    console.sign_in(admin.plaintext)
    [session] = _sessions(store, admin.record.id)
    _age(store, session, last_seen=10, created=ABSOLUTE_TIMEOUT + 5)
    assert console.get("/dashboard").status_code == 303
    assert _sessions(store, admin.record.id) == []  # ended sessions are deleted ...
    console.sign_in(admin.plaintext)
    other = Console(app.test_client())
    other.sign_in(admin.plaintext)
    [first, second] = sorted(_sessions(store, admin.record.id), key=lambda s: s.created_at)
    _age(store, first, last_seen=IDLE_TIMEOUT + 5)
    Console(app.test_client()).sign_in(admin.plaintext)  # ... and purged when anyone signs in
    assert store.get_session(first.id_hash) is None and store.get_session(second.id_hash) is not None


def _sessions(store: Any, key_id: str) -> list[Any]:
    if hasattr(store, "_sessions"):
        return [s for s in store._sessions.values() if s.key_id == key_id]
    import sqlalchemy as sa

    from keys.model import SessionRecord
    from keys.store.schema import sessions_table

    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(sessions_table).where(sessions_table.c.key_id == key_id)).all()
    return [SessionRecord(*row) for row in rows]


def _age(store: Any, session: Any, *, last_seen: float, created: float | None = None) -> None:
    """Make ``session`` look as if it was last used ``last_seen`` seconds ago."""
    now = time.time()
    store.delete_session(session.id_hash)
    store.add_session(session._replace(last_seen_at=now - last_seen,
                                       created_at=now - (created if created is not None else last_seen)))


def test_a_session_ends_when_its_key_is_revoked_elsewhere(console, admin, store, reader, make_app):
    """Revoked through the API of another app on the same store (another worker or instance):
    the session is refused at its next request once the cache bound has passed."""
    console.sign_in(reader.plaintext)
    assert console.get("/dashboard").status_code == 200
    other = make_app(store).test_client()
    assert other.delete(f"/admin/keys/{reader.record.id}", headers={"API-Key": admin.plaintext}).status_code == 204
    time.sleep(0.6)  # the verification cache's staleness bound (0.5 s), as for the API
    resp = console.get("/dashboard")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login"
    assert _sessions(store, reader.record.id) == []


def clock_moves_on(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """From now on, every reader of ``time.time()`` sees a clock ``seconds`` ahead."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


@pytest.mark.parametrize("grace", [None, "1s"])
def test_rotation_ends_the_session_when_the_old_key_stops(console, admin, store, reader, client, grace,
                                                         monkeypatch):
    console.sign_in(reader.plaintext)
    body = {} if grace is None else {"grace": grace}
    assert client.post(f"/admin/keys/{reader.record.id}/rotate", headers={"API-Key": admin.plaintext},
                       json=body).status_code == 201
    if grace:
        assert console.get("/dashboard").status_code == 200  # within the grace period
        clock_moves_on(monkeypatch, 1.1)
    assert console.get("/dashboard").status_code == 303


def test_an_expired_key_ends_its_session(console, store, monkeypatch):
    key = issue_key(store, name="brief", scopes=["data:read"], expires_in=1)
    console.sign_in(key.plaintext)
    assert console.get("/dashboard").status_code == 200
    clock_moves_on(monkeypatch, 1.1)
    assert console.get("/dashboard").status_code == 303


def test_the_keys_allow_list_applies_to_every_console_request(app, store):
    fenced = issue_key(store, name="fenced", scopes=["data:read"], allowed_ips=["10.0.0.0/8"])
    inside = Console(app.test_client())
    inside.client.environ_base["REMOTE_ADDR"] = "10.1.2.3"
    assert inside.sign_in(fenced.plaintext).status_code == 303
    assert inside.get("/dashboard").status_code == 200
    outside = Console(app.test_client())
    resp = outside.sign_in(fenced.plaintext)
    assert resp.status_code == 403 and "Address not allowed" in resp.get_data(as_text=True)
    inside.client.environ_base["REMOTE_ADDR"] = "192.0.2.1"  # the same session, from elsewhere
    resp = inside.get("/dashboard")
    assert resp.status_code == 403 and resp.mimetype == "text/html"


# -- CSRF ----------------------------------------------------------------------------


@pytest.mark.parametrize("csrf", ["", "wrong", "from another session"])
def test_forms_without_the_right_csrf_token_are_403_and_change_nothing(app, console, admin, store, reader, csrf):
    console.sign_in(admin.plaintext)
    if csrf == "from another session":
        other = Console(app.test_client())
        other.sign_in(admin.plaintext)
        csrf = other.token("/dashboard/keys/new")
    before = (store.count(), store.get(reader.record.id), len(store.events(limit=1000)))
    attempts = [
        ("/dashboard/keys/new", {"name": "evil", "scope": "admin"}),
        (f"/dashboard/keys/{reader.record.id}/revoke", {}),
        (f"/dashboard/keys/{reader.record.id}/rotate", {"grace": "0"}),
        (f"/dashboard/keys/{reader.record.id}/edit", {"name": "evil", "scope": "admin"}),
        ("/dashboard/token", {"ttl": "900"}),
        ("/dashboard/revoke", {}),
        ("/logout", {}),
    ]
    for path, data in attempts:
        resp = console.post(path, data, csrf=csrf)
        assert resp.status_code == 403, (path, resp.status_code)
        assert "Form expired or forged" in resp.get_data(as_text=True)
    assert (store.count(), store.get(reader.record.id), len(store.events(limit=1000))) == before
    assert console.get("/dashboard").status_code == 200  # still signed in: logout was refused too
    assert console.post("/dashboard/keys/new", {"name": "x"}, csrf="", headers={
        "Accept": "application/json"}).get_json()["code"] == "csrf_failed"


def test_sign_in_needs_the_csrf_token_of_its_own_form(app, admin, store):
    c = app.test_client()
    resp = c.post("/login", data={"api_key": admin.plaintext})
    assert resp.status_code == 403 and "keygate_session" not in resp.headers.get("Set-Cookie", "")
    other = Console(app.test_client())
    stolen = other.token("/login")  # a token for someone else's pre-session
    resp = c.post("/login", data={"api_key": admin.plaintext, "csrf_token": stolen})
    assert resp.status_code == 403
    assert not [e for e in store.events() if e.event == "console_login"]


# -- sign-in is the API's check ------------------------------------------------------


@pytest.mark.parametrize("value, code", [
    ("", "invalid_credentials"), ("kg_nope", "invalid_credentials"), ("x" * 5000, "invalid_credentials"),
    ("revoked", "key_revoked"), ("expired", "key_expired"),
])
def test_refused_sign_ins_answer_like_the_api_and_are_audited(console, store, app, value, code):
    if value == "revoked":
        key = issue_key(store, name="r", scopes=["data:read"])
        store.revoke(key.record.id, time.time())
        value = key.plaintext
    elif value == "expired":
        value = issue_key(store, name="e", scopes=["data:read"], expires_in=1, now=time.time() - 10).plaintext
    usage = app.extensions["keygate.usage"]
    before = usage.pending_failures().get(code, 0) + store.auth_failures().get(code, 0)
    resp = console.sign_in(value)
    assert resp.status_code == 401 and resp.mimetype == "text/html"
    assert resp.headers["WWW-Authenticate"] == 'ApiKey realm="keygate", error="invalid_token"'
    # The API's failure counters (what the per-address throttle and /admin/audit read) moved.
    assert usage.pending_failures().get(code, 0) + store.auth_failures().get(code, 0) == before + 1
    [event] = [e for e in store.events() if e.event == "console_login_refused"]
    assert event.detail == {"code": code} and event.actor == f"console:{event.key_id}"
    assert console.session_cookie() is None
    resp = console.post("/login", {"api_key": value}, headers={"Accept": "application/json"})
    assert resp.status_code == 401 and resp.get_json()["code"] == code


def test_sign_in_counts_against_the_keys_rate_limit_like_a_request(console, store):
    key = issue_key(store, name="slow", scopes=["data:read"], rate_limit="2/minute")
    for _ in range(2):
        assert Console(console.client.application.test_client()).sign_in(key.plaintext).status_code == 303
    resp = console.sign_in(key.plaintext)
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    assert "Too many requests" in resp.get_data(as_text=True)


def test_console_changes_count_against_the_keys_rate_limit(console, store):
    key = issue_key(store, name="slow", scopes=["data:read"], rate_limit="3/minute")
    console.sign_in(key.plaintext)  # one
    for _ in range(2):
        assert console.post("/dashboard/token", {"ttl": "900", "scope": "data:read"},
                            form_from="/dashboard").status_code == 200
    resp = console.post("/dashboard/token", {"ttl": "900"}, form_from="/dashboard")
    assert resp.status_code == 429 and resp.headers["Retry-After"]
    assert console.get("/dashboard").status_code == 200  # reading a page is no request of the key's


def test_a_session_is_no_api_credential_and_the_api_sets_no_cookie(console, admin, client):
    console.sign_in(admin.plaintext)
    resp = client.get("/admin/keys")  # the session cookie goes along; it opens nothing
    assert resp.status_code == 401 and resp.get_json()["code"] == "missing_credentials"
    assert "Set-Cookie" not in resp.headers and "Content-Security-Policy" not in resp.headers
    ok = client.get("/admin/keys", headers={"API-Key": admin.plaintext})
    assert ok.status_code == 200 and "Set-Cookie" not in ok.headers and "Vary" not in ok.headers


# -- what each key sees ------------------------------------------------------------------


def test_a_data_read_key_sees_only_itself_and_mints_a_token(console, reader, client, store):
    console.sign_in(reader.plaintext)
    page = console.get("/dashboard").get_data(as_text=True)
    assert reader.record.id in page and "Mint a query token" in page and ">Keys<" not in page
    for path in ("/dashboard/keys", "/dashboard/audit", "/dashboard/keys/new",
                 f"/dashboard/keys/{reader.record.id}", f"/dashboard/keys/{reader.record.id}/edit"):
        resp = console.get(path)
        assert resp.status_code == 403 and resp.mimetype == "text/html", path
    assert console.post("/dashboard/keys/new", {"name": "x", "scope": "admin"},
                        csrf=console.token("/dashboard")).status_code == 403
    resp = console.post("/dashboard/token", {"ttl": "900", "scope": "data:read"}, form_from="/dashboard")
    assert resp.status_code == 200
    token = re.search(r'id="token" class="secret" type="text" value="([^"]+)"', resp.get_data(as_text=True)).group(1)
    assert client.get("/data", query_string={"token": token}).status_code == 200
    [event] = store.events(key_id=reader.record.id, event="mint_token")
    assert event.actor == f"console:{reader.record.id}"
    # A scope the key doesn't hold can't be smuggled into the form.
    resp = console.post("/dashboard/token", {"ttl": "900", "scope": "admin"}, form_from="/dashboard")
    assert resp.status_code == 403
    resp = console.post("/dashboard/token", {"ttl": "31536000"}, form_from="/dashboard")
    assert resp.status_code == 400


def test_self_service_rotate_and_revoke(console, reader, client, store):
    console.sign_in(reader.plaintext)
    assert "Rotate" in console.get("/dashboard/rotate").get_data(as_text=True)
    resp = console.post("/dashboard/rotate", {"grace": "3600"})
    new_key = re.search(r'value="(kg_[0-9A-Za-z]+)"', resp.get_data(as_text=True)).group(1)
    assert client.get("/data", headers={"API-Key": new_key}).status_code == 200
    assert client.get("/data", headers={"API-Key": reader.plaintext}).status_code == 200  # grace
    assert console.get("/dashboard").status_code == 200  # the session goes on while the old key does
    fresh = Console(client.application.test_client())
    fresh.sign_in(new_key)
    assert "Revoke" in fresh.get("/dashboard/revoke").get_data(as_text=True)
    resp = fresh.post("/dashboard/revoke")
    assert resp.status_code == 303 and resp.headers["Location"].startswith("/login")
    assert client.get("/data", headers={"API-Key": new_key}).get_json()["code"] == "key_revoked"
    assert fresh.get("/dashboard").status_code == 303
    actors = {e.actor for e in store.events() if e.event in ("rotate", "revoke")}
    assert actors <= {f"console:{reader.record.id}", f"console:{fresh_id(store, new_key)}"}


def fresh_id(store: Any, plaintext: str) -> str:
    from keys import find_by_plaintext

    return find_by_plaintext(store, plaintext).id


def test_an_admin_manages_keys(console, admin, client, store):
    console.sign_in(admin.plaintext)
    resp = console.post("/dashboard/keys/new", {"name": "svc", "scope": ["secret:read", "data:read"],
                                                "rate_limit": "100/minute", "allowed_ips": "127.0.0.1/32\n10.0.0.0/8"})
    assert resp.status_code == 200
    page = resp.get_data(as_text=True)
    plaintext = re.search(r'value="(kg_[0-9A-Za-z]+)"', page).group(1)
    key_id = fresh_id(store, plaintext)
    assert client.get("/secret", headers={"API-Key": plaintext}).status_code == 200
    # Shown once: no other page has it.
    for path in ("/dashboard/keys", f"/dashboard/keys/{key_id}", "/dashboard/audit", "/dashboard"):
        assert plaintext not in console.get(path).get_data(as_text=True)
    # Edit: narrower scopes, without rotating; takes effect at once here.
    resp = console.post(f"/dashboard/keys/{key_id}/edit", {"name": "svc2", "scope": "data:read", "rate_limit": "",
                                                           "allowed_ips": "", "expires_in": "7d"})
    assert resp.status_code == 303 and resp.headers["Location"] == f"/dashboard/keys/{key_id}"
    assert client.get("/secret", headers={"API-Key": plaintext}).get_json()["code"] == "insufficient_scope"
    record = store.get(key_id)
    assert (record.name, record.scopes, record.rate_limit, record.allowed_ips) == ("svc2", ("data:read",), None, ())
    assert record.expires_at is not None
    resp = console.post(f"/dashboard/keys/{key_id}/edit", {"name": "", "scope": "data:read"})
    assert resp.status_code == 400 and "name must not be empty" in resp.get_data(as_text=True)
    # Filters and paging.
    listed = console.get("/dashboard/keys?name=SVC&state=active&scope=data:read").get_data(as_text=True)
    assert f"<td><code>{key_id}</code></td>" in listed and f"<td><code>{admin.record.id}</code></td>" not in listed
    assert console.get("/dashboard/keys?state=nope").status_code == 400
    assert console.get("/dashboard/keys?after=../../etc").status_code == 400
    # Rotate with grace: a new key shown once; the old works until the grace ends.
    resp = console.post(f"/dashboard/keys/{key_id}/rotate", {"grace": "3600"})
    rotated = re.search(r'value="(kg_[0-9A-Za-z]+)"', resp.get_data(as_text=True)).group(1)
    assert client.get("/data", headers={"API-Key": rotated}).status_code == 200
    assert client.get("/data", headers={"API-Key": plaintext}).status_code == 200
    assert "grace" in console.get(f"/dashboard/keys/{key_id}").get_data(as_text=True)
    # Revoke, with a confirmation page first.
    new_id = fresh_id(store, rotated)
    assert "Yes, revoke it" in console.get(f"/dashboard/keys/{new_id}/revoke").get_data(as_text=True)
    assert console.post(f"/dashboard/keys/{new_id}/revoke").status_code == 303
    assert client.get("/data", headers={"API-Key": rotated}).get_json()["code"] == "key_revoked"
    assert console.post(f"/dashboard/keys/{new_id}/edit", {"name": "x", "scope": "data:read"}).status_code == 409
    # Audit trail, filtered; every change by console:<admin id>.
    audit = console.get(f"/dashboard/audit?key_id={key_id}&event=update").get_data(as_text=True)
    assert "update" in audit and f"console:{admin.record.id}" in audit and "Failed authentication" in audit
    for bad in ("key_id=nope", "event=%3Cscript%3E", "before=-1"):
        assert console.get(f"/dashboard/audit?{bad}").status_code == 400
    assert {e.actor for e in store.events() if e.event in ("create", "update", "rotate", "revoke")
            and e.key_id in (key_id, new_id)} == {f"console:{admin.record.id}"}
    assert console.get("/dashboard/keys/AAAAAAAAAAAA").status_code == 404


def test_stored_text_is_escaped_everywhere(console, store):
    admin = issue_key(store, name=XSS, scopes=["admin"])
    issue_key(store, name='"><img src=x onerror=alert(1)>', scopes=["data:read"])
    console.sign_in(admin.plaintext)
    pages = ["/dashboard", "/dashboard/keys", f"/dashboard/keys/{admin.record.id}", "/dashboard/audit",
             f"/dashboard/keys/{admin.record.id}/edit", f"/dashboard/keys/{admin.record.id}/revoke",
             "/dashboard/keys?name=" + XSS]
    for path in pages:
        body = console.get(path).get_data(as_text=True)
        assert XSS not in body and "<img src=x" not in body, path
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in console.get("/dashboard").get_data(as_text=True)


def test_every_console_response_has_the_headers_and_errors_are_pages(console, admin):
    for path in ("/login", "/dashboard", "/dashboard/static/simple.css", "/dashboard/static/console.js",
                 "/dashboard/static/chart.css", "/dashboard/static/nope.css", "/dashboard/nope"):
        console.get(path)  # checks the headers
    assert console.client.put("/login").status_code == 405
    assert_console_headers(console.client.put("/login"))
    console.sign_in(admin.plaintext)
    resp = console.get("/dashboard/nope")
    assert resp.status_code == 404 and resp.mimetype == "text/html" and "Not found" in resp.get_data(as_text=True)
    resp = console.get("/dashboard/nope", headers={"Accept": "application/json"})
    assert resp.status_code == 404 and resp.mimetype == "application/problem+json"
    assert resp.get_json()["code"] == "not_found"
    resp = console.client.put("/logout", headers={"Accept": "application/problem+json"})
    assert resp.status_code == 405 and resp.get_json()["code"] == "method_not_allowed" and resp.headers["Allow"]
    assert_console_headers(resp)


def test_a_chart_and_a_table_of_real_usage(console, admin, store, app, client):
    usage = app.extensions["keygate.usage"]
    key = issue_key(store, name="busy", scopes=["data:read"], rate_limit="4/minute")
    client.get("/secret", headers={"API-Key": key.plaintext})  # refused for scope: spends one of the 4
    for _ in range(6):
        client.get("/data", headers={"API-Key": key.plaintext})
    usage.flush()
    console.sign_in(admin.plaintext)
    page = console.get(f"/dashboard/keys/{key.record.id}").get_data(as_text=True)
    svg = page[page.index("<svg"):page.index("</svg>")]
    assert "<script" not in svg and "<style" not in svg and 'style="' not in svg
    assert "accepted: 3" in svg and "refused: rate limit: 3" in svg and "refused: scope: 1" in svg
    assert len(re.findall(r'class="rect reactive tooltip-trigger"', svg)) == 3 * 24 or \
        len(re.findall(r'class="rect reactive tooltip-trigger"', svg)) == 3 * 25
    table = page[page.index("<table>"):]
    assert re.search(r'<td class="num">3</td>\s*<td class="num">3</td><td class="num">1</td>', table.replace("\n", ""))
    day = console.get(f"/dashboard/keys/{key.record.id}?interval=day").get_data(as_text=True)
    assert "Requests per day" in day


def test_a_huge_form_is_413_and_reads_nothing(console, store):
    resp = console.post("/login", {"api_key": "x" * 200_000})
    assert resp.status_code == 413 and resp.mimetype == "text/html"
    assert not [e for e in store.events() if e.event.startswith("console_login")]


def test_sign_in_goes_through_keyauth_so_its_failure_hooks_and_throttles_apply(console, app, admin, store):
    """The per-address throttle of refused credentials lives in KeyAuth's request path (its
    failure hooks, and a refusal before the key is checked): sign-in takes that path."""
    auth = app.extensions["keygate"].auth
    seen: list[str] = []
    auth.on_failure(lambda e: seen.append(e.code))
    console.sign_in("kg_nope")
    assert seen == ["invalid_credentials"]

    from keys.parse import parse_rate_limit

    app.extensions["keygate.ratelimits"].auth_failure_limit = parse_rate_limit("2/minute")
    console.sign_in("kg_nope")  # the second guess of two
    resp = console.sign_in(admin.plaintext)  # a good key, from a throttled address
    assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
    assert "too many refused credentials" in resp.get_data(as_text=True)
    assert console.session_cookie() is None
    assert seen[-1] == "auth_throttled"
    # The throttled attempt checked no credential: counted, not audited as a refused sign-in.
    assert len([e for e in store.events() if e.event == "console_login_refused"]) == 2
