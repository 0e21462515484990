"""The HTTP surface through the Flask test client: pages, problem responses and their
headers, hostile API-Key values, the API documents, proxies, and start-up configuration."""

from __future__ import annotations

import os
import re
import stat
import time

import pytest

from api import create_app
from conftest import strong_secret
from keys import StoreUnavailable, issue_key, open_store
from keys.exc import ConfigError
from keys.keyformat import CHECKSUM_LENGTH, ID_LENGTH, PREFIX, generate_key
from keys.store import MemoryKeyStore

PROBLEM = "application/problem+json"
PROBLEM_FIELDS = {"type", "title", "status", "detail", "code", "instance", "request_id"}
CHALLENGE = 'ApiKey realm="keygate"'
REFUSED_CHALLENGE = 'ApiKey realm="keygate", error="invalid_token"'
CLOSED_PG = "postgresql://postgres@127.0.0.1:1/test"
SQL_ONLY = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)

MESSAGES = {
    "/secret": "Welcome to the secret page!",
    "/data": "Here is your data.",
    "/admin": "Welcome, admin!",
}
SCOPE_OF = {"/secret": "secret:read", "/data": "data:read", "/admin": "admin"}


def common_headers(resp) -> None:  # noqa: ANN001
    assert resp.headers.get("X-Content-Type-Options") == "nosniff"
    if resp.status_code in (401, 403, 429):
        assert resp.headers.get("Cache-Control") == "no-store"
    if resp.status_code == 401:
        assert resp.headers.get("WWW-Authenticate") in (CHALLENGE, REFUSED_CHALLENGE)
    else:
        assert "WWW-Authenticate" not in resp.headers


def problem(resp, status: int, code: str, path: str | None = None) -> dict:  # noqa: ANN001
    """Assert ``resp`` is the RFC 9457 problem the contract promises and return its body."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.headers["Content-Type"] == PROBLEM
    body = resp.get_json(force=True)
    assert set(body) == PROBLEM_FIELDS, body
    assert body["status"] == status and body["code"] == code, body
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["request_id"] == resp.headers["X-Request-ID"], "the id the client can quote"
    if path is not None:
        assert body["instance"] == path
    common_headers(resp)
    return body


def ok(resp, path: str) -> dict:  # noqa: ANN001
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["message"] == MESSAGES[path]
    assert resp.headers.get("Cache-Control") == "no-store"
    common_headers(resp)
    return body


class Harness:
    """An app over one store, and a way to make keys for it."""

    def __init__(self, store, url: str, config: dict | None = None) -> None:  # noqa: ANN001
        self.store = store
        self.app = create_app({"DATABASE_URL": url, **(config or {})}, store=store)
        self.client = self.app.test_client()

    def key(self, *scopes: str, **kw) -> str:  # noqa: ANN003
        return issue_key(self.store, name=kw.pop("name", "http"), scopes=scopes or ["secret:read"], **kw).plaintext

    def get(self, path: str, key: str | None = None, **kw):  # noqa: ANN003, ANN201
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["API-Key"] = key
        return self.client.get(path, headers=headers, **kw)

    def raw(self, path: str, value: str, **kw):  # noqa: ANN003, ANN201
        """Send ``value`` as the API-Key header exactly as a WSGI server would pass it on."""
        return self.client.get(path, environ_overrides={"HTTP_API_KEY": value}, **kw)


def shut(app) -> None:  # noqa: ANN001
    """Flush and stop the app's usage writer while its store still exists."""
    app.extensions["keygate.usage"].close()


@pytest.fixture
def apps():  # noqa: ANN201
    """Collects the apps a test builds, and shuts them down before its store goes."""
    built: list = []
    yield built
    for app in built:
        shut(app)


@pytest.fixture
def h(store, store_url, apps) -> Harness:  # noqa: ANN001
    """The app over every backend."""
    harness = Harness(store, store_url)
    apps.append(harness.app)
    return harness


@pytest.fixture
def mem(apps) -> Harness:  # noqa: ANN001
    """The app over a memory store, where the backend does not matter."""
    harness = Harness(MemoryKeyStore(), "memory://")
    apps.append(harness.app)
    return harness


# -- success --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/secret", "/data", "/admin"])
def test_each_page_opens_with_its_scope(h, path):
    key = h.key(SCOPE_OF[path], name="page-user")
    body = ok(h.get(path, key), path)
    caller = body["caller"]
    assert caller["name"] == "page-user"
    assert caller["scopes"] == [SCOPE_OF[path]]
    assert caller["via"] == "header"
    assert key.startswith(PREFIX + caller["id"])
    assert key not in resp_text(h.get(path, key))


def resp_text(resp) -> str:  # noqa: ANN001
    return resp.get_data(as_text=True) + str(dict(resp.headers))


@pytest.mark.parametrize("path", ["/secret", "/data", "/admin"])
def test_admin_opens_every_page(mem, path):
    ok(mem.get(path, mem.key("admin")), path)


def test_a_key_with_several_scopes_opens_each(mem):
    key = mem.key("secret:read", "data:read")
    ok(mem.get("/secret", key), "/secret")
    ok(mem.get("/data", key), "/data")
    problem(mem.get("/admin", key), 403, "insufficient_scope", "/admin")


def test_healthz_needs_no_key(mem):
    resp = mem.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}
    common_headers(resp)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/secret", "/data", "/admin"])
def test_missing_credentials(h, path):
    resp = h.get(path)
    problem(resp, 401, "missing_credentials", path)
    assert resp.headers["WWW-Authenticate"] == CHALLENGE


@pytest.mark.parametrize("path", ["/secret", "/data", "/admin"])
def test_invalid_credentials(h, path):
    resp = h.get(path, generate_key().plaintext)
    body = problem(resp, 401, "invalid_credentials", path)
    assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE
    # A wrong secret for a real key id gets the very same answer.
    real = h.key(SCOPE_OF[path])
    wrong = generate_key(real[len(PREFIX) : len(PREFIX) + ID_LENGTH]).plaintext
    again = h.get(path, wrong)
    same = problem(again, 401, "invalid_credentials", path)
    assert same.pop("request_id") != body.pop("request_id")  # each request its own id ...
    assert same == body  # ... and otherwise the very same answer
    assert again.headers["WWW-Authenticate"] == REFUSED_CHALLENGE


def test_key_revoked(h):
    key = h.key("secret:read")
    h.store.revoke(key[len(PREFIX) : len(PREFIX) + ID_LENGTH], time.time() - 1)
    resp = h.get("/secret", key)
    problem(resp, 401, "key_revoked", "/secret")
    assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE


def test_key_revoked_is_only_told_to_the_secret_holder(h):
    key = h.key("secret:read")
    key_id = key[len(PREFIX) : len(PREFIX) + ID_LENGTH]
    h.store.revoke(key_id, time.time() - 1)
    problem(h.get("/secret", generate_key(key_id).plaintext), 401, "invalid_credentials", "/secret")


def test_key_expired(h):
    key = h.key("secret:read", expires_in=60, now=time.time() - 3600)
    resp = h.get("/secret", key)
    problem(resp, 401, "key_expired", "/secret")
    assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE


@pytest.mark.parametrize(("held", "path"), [
    ("secret:read", "/data"), ("secret:read", "/admin"), ("data:read", "/secret"), ("data:read", "/admin"),
])
def test_insufficient_scope_names_the_scope(h, held, path):
    resp = h.get(path, h.key(held))
    body = problem(resp, 403, "insufficient_scope", path)
    assert SCOPE_OF[path] in body["detail"]


def test_ip_not_allowed(h):
    key = h.key("secret:read", allowed_ips=["10.0.0.0/8", "2001:db8::/32"])
    for addr in ("192.0.2.1", "2001:db9::1", "::ffff:192.0.2.1"):
        resp = h.get("/secret", key, environ_base={"REMOTE_ADDR": addr})
        problem(resp, 403, "ip_not_allowed", "/secret")
    for addr in ("10.1.2.3", "2001:db8::5", "::ffff:10.0.0.1"):
        ok(h.get("/secret", key, environ_base={"REMOTE_ADDR": addr}), "/secret")


def test_ip_check_comes_after_the_key_check(mem):
    """A stranger's wrong key from a foreign address learns nothing about allow-lists."""
    key = mem.key("secret:read", allowed_ips=["10.0.0.0/8"])
    wrong = generate_key(key[len(PREFIX) : len(PREFIX) + ID_LENGTH]).plaintext
    resp = mem.get("/secret", wrong, environ_base={"REMOTE_ADDR": "192.0.2.1"})
    problem(resp, 401, "invalid_credentials", "/secret")


@pytest.mark.parametrize("path", ["/nope", "/secret/extra", "/secrets", "/SECRET", "/%00", "/admin/keys/x/y/z"])
def test_not_found(mem, path):
    resp = mem.client.get(path)
    problem(resp, 404, "not_found")


def test_unknown_key_id_under_admin_is_not_found(mem):
    resp = mem.get(f"/admin/keys/{generate_key().key_id}", mem.key("admin"))
    problem(resp, 404, "not_found")


@pytest.mark.parametrize("suffix", ["", "/rotate"])
def test_a_key_pasted_where_its_id_belongs_is_recognised_and_never_echoed(mem, suffix):
    """``GET /admin/keys/<the key>``: the answer says what was sent and what the id is, and
    holds no part of the secret (not in the detail, not in ``instance``)."""
    admin = mem.key("admin")
    pasted = mem.key("secret:read")
    method = "POST" if suffix else "GET"
    resp = mem.client.open(f"/admin/keys/{pasted}{suffix}", method=method, headers={"API-Key": admin})
    body = problem(resp, 404, "not_found")
    assert "that is an API key, not a key id" in body["detail"] and pasted[3:15] in body["detail"]
    secret = pasted[15:]
    text = resp.get_data(as_text=True)
    assert not any(secret[i:i + 8] in text for i in range(len(secret) - 7)), text
    # Anywhere else in a URL too: the 404 of an unknown path doesn't repeat it.
    text = mem.client.get(f"/files/{pasted}").get_data(as_text=True)
    assert pasted[15:] not in text and "[REDACTED]" in text


@pytest.mark.parametrize(("header", "value"), [
    ("Authorization", "Bearer {key}"), ("Authorization", "{key}"), ("Authorization", "ApiKey {key}"),
    ("X-API-Key", "{key}"), ("x-api-key", " {key} "),
])
def test_a_key_in_a_header_keygate_does_not_read_gets_a_hint(mem, header, value):
    key = mem.key("secret:read")
    resp = mem.client.get("/secret", headers={header: value.format(key=key)})
    body = problem(resp, 401, "missing_credentials", "/secret")
    assert resp.headers["WWW-Authenticate"] == CHALLENGE  # nothing was sent where it is read
    assert "Send a credential in the API-Key header" in body["detail"]
    assert header.lower() in body["detail"].lower(), body["detail"]
    assert key not in resp.get_data(as_text=True) and key[3:15] not in resp.get_data(as_text=True)


@pytest.mark.parametrize(("header", "value"), [
    ("Authorization", "Basic dXNlcjpwYXNz"), ("Authorization", "Bearer kg_not_a_real_key"),
    ("X-API-Key", "hello"), ("X-Other", "{key}"),
])
def test_no_hint_for_what_is_not_a_key_in_a_known_wrong_place(mem, header, value):
    resp = mem.client.get("/secret", headers={header: value.format(key=mem.key("secret:read"))})
    body = problem(resp, 401, "missing_credentials", "/secret")
    assert body["detail"] == "Send a credential in the API-Key header."


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/secret"), ("PUT", "/secret"), ("DELETE", "/data"), ("PATCH", "/admin"), ("POST", "/healthz"),
    ("DELETE", "/tokens"),
])
def test_method_not_allowed_carries_allow(mem, method, path):
    resp = mem.client.open(path, method=method, headers={"API-Key": mem.key("admin")})
    problem(resp, 405, "method_not_allowed", path)
    allowed = {m.strip() for m in resp.headers["Allow"].split(",")}
    assert ("POST" if path == "/tokens" else "GET") in allowed
    assert method not in allowed


@pytest.mark.parametrize(("path", "kwargs"), [
    ("/tokens", {"data": "{not json", "content_type": "application/json"}),
    ("/tokens", {"json": ["not", "an", "object"]}),
    ("/tokens", {"json": {"ttl": "soon"}}),
    ("/tokens", {"json": {"scopez": ["data:read"]}}),
])
def test_invalid_request_body(mem, path, kwargs):
    resp = mem.client.post(path, headers={"API-Key": mem.key("data:read")}, **kwargs)
    body = problem(resp, 400, "invalid_request", path)
    assert body["detail"]
    assert resp.headers.get("Cache-Control") == "no-store"  # the caller was authenticated


@pytest.mark.parametrize("query", ["limit=0", "limit=abc", "limit=１０", "limit=99999999999999999999"])
def test_invalid_request_query(mem, query):
    resp = mem.client.get(f"/admin/keys?{query}", headers={"API-Key": mem.key("admin")})
    problem(resp, 400, "invalid_request", "/admin/keys")


def test_multiple_credentials(mem):
    resp = mem.client.get("/data?token=abc", headers={"API-Key": mem.key("data:read")})
    problem(resp, 400, "multiple_credentials", "/data")


def test_a_raw_key_is_never_accepted_in_the_url(mem):
    key = mem.key("admin")
    resp = mem.client.get(f"/data?token={key}")
    body = problem(resp, 401, "invalid_token", "/data")
    assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE
    assert key not in body["detail"]


def test_an_unreachable_store_is_503_not_500(apps):
    h = Harness(open_store(CLOSED_PG), CLOSED_PG)
    apps.append(h.app)
    for path in ("/secret", "/data"):
        resp = h.get(path, generate_key().plaintext)
        problem(resp, 503, "store_unavailable", path)
    problem(h.get("/secret"), 401, "missing_credentials", "/secret")  # no store needed for that
    h.app.extensions["keygate.usage"].store = MemoryKeyStore()  # its failure counts have nowhere to go


# -- hostile API-Key values -------------------------------------------------------------


def _mojibake(text: str) -> str:
    """What a WSGI server hands the app for UTF-8 bytes on the wire (PEP 3333: latin-1)."""
    return text.encode("utf-8").decode("latin-1")


HOSTILE = {
    "8KB": lambda k, o: "A" * 8192,
    "8KB-prefixed": lambda k, o: "kg_" + "A" * 8189,
    "non-ascii": lambda k, o: _mojibake("kg_ключ🔑"),
    "non-ascii-in-key": lambda k, o: k[:20] + _mojibake("é") + k[22:],
    "latin-1": lambda k, o: "kg_" + "é" * (len(k) - 3),
    "nul": lambda k, o: "\x00",
    "nul-in-key": lambda k, o: k[:20] + "\x00" + k[21:],
    "nul-after-key": lambda k, o: k + "\x00",
    "sql-or": lambda k, o: "' OR 1=1 --",
    "sql-drop": lambda k, o: "kg_'; DROP TABLE api_keys; --",
    "sql-drop-after-real-id": lambda k, o: k[: len(PREFIX) + ID_LENGTH] + "'; DROP TABLE api_keys; --",
    "sql-drop-padded": lambda k, o: (k[: len(PREFIX) + ID_LENGTH] + "';DROP TABLE api_keys;--" + "x" * 50)[: len(k)],
    "whitespace": lambda k, o: "   ",
    "tab": lambda k, o: "\t",
    "empty": lambda k, o: "",
    "two-keys": lambda k, o: k + "," + o,
    "two-keys-spaced": lambda k, o: k + ", " + o,
    "scheme": lambda k, o: "ApiKey " + k,
    "bearer": lambda k, o: "Bearer " + k,
    "uppercased": lambda k, o: k.upper(),
    "no-checksum": lambda k, o: k[:-CHECKSUM_LENGTH],
    "percent-encoded": lambda k, o: k.replace("_", "%5F"),
    "crlf": lambda k, o: k + "\r\nX-Admin: 1",
    "format-string": lambda k, o: "%s%s%s%n{0}{key}",
    "json": lambda k, o: '{"key": "' + k + '"}',
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_api_key_values_are_refused_cleanly(h, name):
    key, other = h.key("admin"), h.key("secret:read")
    count = h.store.count()
    value = HOSTILE[name](key, other)
    resp = h.raw("/secret", value)
    assert resp.status_code in (400, 401), (resp.status_code, resp.get_data(as_text=True))
    body = problem(resp, resp.status_code, resp.get_json(force=True)["code"], "/secret")
    assert body["code"] in ("missing_credentials", "invalid_credentials", "invalid_request"), body
    if body["code"] == "missing_credentials":
        assert resp.headers["WWW-Authenticate"] == CHALLENGE
    else:
        assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE
    assert key not in resp_text(resp) and other not in resp_text(resp)
    # The store is intact and still serves.
    assert h.store.count() == count
    ok(h.get("/secret", key), "/secret")
    ok(h.get("/secret", other), "/secret")


@pytest.mark.parametrize("padded", [" {}", "{} ", "\t{}\t"])
def test_spaces_around_the_key_are_not_part_of_it(h, padded):
    """RFC 9110 §5.5: surrounding whitespace is not part of a field value. Servers strip
    it; the app does too, so the answer is the same behind any server."""
    key = h.key("secret:read")
    ok(h.raw("/secret", padded.format(key)), "/secret")


def test_an_empty_api_key_header_counts_as_sent(mem):
    """An empty header was still sent: it is refused as a bad credential, not as none."""
    resp = mem.raw("/secret", "")
    problem(resp, 401, "invalid_credentials", "/secret")
    assert resp.headers["WWW-Authenticate"] == REFUSED_CHALLENGE


def test_hostile_values_through_the_normal_header_api(mem):
    """The same through werkzeug's own header handling (which refuses CR/LF itself)."""
    key = mem.key("secret:read")
    for value in ("A" * 8192, "' OR 1=1 --", "kg_'; DROP TABLE api_keys; --", key + ", " + key, " ", key + " "):
        resp = mem.get("/secret", value)
        assert resp.status_code == 401 or (resp.status_code == 200 and value.strip() == key)
    ok(mem.get("/secret", key), "/secret")


# -- documents --------------------------------------------------------------------------


def test_docs_serves_swagger_ui(mem):
    resp = mem.client.get("/docs")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert "swagger-ui" in html.lower()
    common_headers(resp)
    # The UI's document offers Authorize for both the header and the query token.
    spec_url = re.search(r'url:\s*"([^"]+)"', html).group(1)
    spec = mem.client.get(spec_url).get_json()
    schemes = spec.get("components", {}).get("securitySchemes") or spec.get("securityDefinitions")
    assert {(s["type"], s["in"], s["name"]) for s in schemes.values()} >= {
        ("apiKey", "header", "API-Key"), ("apiKey", "query", "token")}


def test_openapi_json_declares_both_schemes_and_per_operation_security(mem):
    resp = mem.client.get("/openapi.json")
    assert resp.status_code == 200
    common_headers(resp)
    spec = resp.get_json()
    assert {name: (s["type"], s["in"], s["name"]) for name, s in spec["components"]["securitySchemes"].items()} == {
        "apiKey": ("apiKey", "header", "API-Key"),
        "token": ("apiKey", "query", "token"),
    }
    paths = spec["paths"]
    assert paths["/secret"]["get"]["security"] == [{"apiKey": []}]
    assert paths["/admin"]["get"]["security"] == [{"apiKey": []}]
    assert paths["/data"]["get"]["security"] == [{"apiKey": []}, {"token": []}]
    assert paths["/healthz"]["get"]["security"] == []
    for path, ops in paths.items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                assert "security" in op, (method, path)


# -- proxies ----------------------------------------------------------------------------


def _proxied(h: Harness, key: str, remote: str, forwarded: str):  # noqa: ANN202
    return h.get("/secret", key, headers={"X-Forwarded-For": forwarded}, environ_base={"REMOTE_ADDR": remote})


def test_x_forwarded_for_is_ignored_by_default(mem):
    key = mem.key("secret:read", allowed_ips=["10.0.0.0/8"])
    # A stranger can't spoof an allowed address...
    problem(_proxied(mem, key, "203.0.113.7", "10.0.0.1"), 403, "ip_not_allowed", "/secret")
    # ...and an allowed caller isn't locked out by a header it happens to send.
    ok(_proxied(mem, key, "10.0.0.1", "203.0.113.7"), "/secret")


def test_trusted_proxies_honours_the_last_forwarded_hop(monkeypatch, apps):
    monkeypatch.setenv("KEYGATE_TRUSTED_PROXIES", "1")
    h = Harness(MemoryKeyStore(), "memory://")
    apps.append(h.app)
    key = h.key("secret:read", allowed_ips=["10.0.0.0/8"])
    ok(_proxied(h, key, "127.0.0.1", "10.0.0.1"), "/secret")
    problem(_proxied(h, key, "127.0.0.1", "203.0.113.7"), 403, "ip_not_allowed", "/secret")
    # The client wrote the first entry, the proxy appended the real address: the first is not trusted.
    problem(_proxied(h, key, "127.0.0.1", "10.0.0.1, 203.0.113.7"), 403, "ip_not_allowed", "/secret")
    ok(_proxied(h, key, "127.0.0.1", "203.0.113.7, 10.0.0.1"), "/secret")


# -- configuration ----------------------------------------------------------------------


def config_error(config: dict | None, variable: str) -> str:
    with pytest.raises(ConfigError) as info:
        create_app(config)
    message = str(info.value)
    assert variable in message, message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("url", ["mysql://x", "mongodb://localhost/db", "sqlite", "postgresql://u@h:notaport/db",
                                 "not a url", "postgresql+nosuchdriver://h/db"])
def test_bad_database_url(url):
    config_error({"DATABASE_URL": url}, "KEYGATE_DATABASE_URL")


def test_bad_database_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("KEYGATE_DATABASE_URL", "mysql://x")
    config_error(None, "KEYGATE_DATABASE_URL")


@SQL_ONLY
def test_uninitialised_store(store_url):
    message = config_error({"DATABASE_URL": store_url}, "KEYGATE_DATABASE_URL")
    assert "init" in message


WEAK_SECRETS = {
    "short": "short", "31 characters": "x" * 31, "blank": " ", "a comma": ",",
    "one of a list": strong_secret() + ",short",
    # issue 12: long, but not secret
    "36 a's": "a" * 36, "changeme": "changeme-changeme-changeme-changeme",
    "few distinct characters": "0123456789a" * 4,
    "repetitive": "abcdefghijklm0" * 4,
    "placeholder word, long and random": "Example" + strong_secret(),
    "another placeholder": strong_secret()[:20] + "password" + strong_secret()[:20],
    "the second of a rotation": strong_secret() + ",my-test-secret-" + strong_secret(),
}


@pytest.mark.parametrize("secret", WEAK_SECRETS.values(), ids=WEAK_SECRETS.keys())
def test_weak_secret_key(secret):
    message = config_error({"DATABASE_URL": "memory://", "SECRET_KEY": secret}, "KEYGATE_SECRET_KEY")
    assert "secrets.token_hex(32)" in message or "empty" in message  # how to make a good one
    weak = secret.split(",")[-1]
    assert len(weak) < 16 or weak not in message  # a real secret is never echoed


@pytest.mark.slow
def test_apps_closed_and_dropped_are_freed(tmp_path) -> None:  # noqa: ANN001
    """Nothing module-level keeps an app alive (a Flask-RESTX Namespace remembers every Api it
    joined): a test suite, or anything else that builds apps, held every app it built. In a
    process of its own: this suite's fixtures keep each test's apps until its teardown."""
    import subprocess
    import sys

    from conftest import ROOT

    script = f"""
import gc, weakref
from api import create_app
from keys.store import MemoryKeyStore
refs = []
for i in range(3):
    app = create_app({{"DATABASE_URL": "memory://", "INSTANCE_PATH": {str(tmp_path)!r} + f"/app{{i}}",
                      "SECRET_KEY": {strong_secret()!r}}}, store=MemoryKeyStore())
    assert app.test_client().get("/healthz").status_code == 200
    app.extensions["keygate.close"]()
    refs.append(weakref.ref(app))
    del app
gc.collect()
print(sum(ref() is not None for ref in refs))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


@pytest.mark.parametrize("shape", ["one", "mixed", "two comma-separated"])
def test_strong_secret_keys_are_accepted(shape, apps):
    # Made in the test, not at collection: every xdist worker must collect the same ids.
    secret = {"one": strong_secret(), "mixed": "Zq8#tL1!" * 2 + strong_secret()[:24],
              "two comma-separated": strong_secret() + "," + strong_secret()}[shape]
    apps.append(create_app({"DATABASE_URL": "memory://", "SECRET_KEY": secret}, store=MemoryKeyStore()))


def test_the_documented_generator_always_makes_an_accepted_secret():
    """What the error message and `init` tell people to run: hexadecimal spells none of the
    placeholder words, and 64 random hex digits are neither repetitive nor few."""
    import secrets

    from keys.strength import GENERATE_SECRET, weakness

    assert "token_hex(32)" in GENERATE_SECRET
    assert all(weakness(secrets.token_hex(32)) is None for _ in range(2000))


@pytest.mark.parametrize("url", ["memcached://127.0.0.1:11211", "mongodb://h", "nonsense", "http://h:6379"])
def test_unknown_ratelimit_storage(url):
    config_error({"DATABASE_URL": "memory://", "RATELIMIT_STORAGE_URL": url}, "KEYGATE_RATELIMIT_STORAGE_URL")


@pytest.mark.parametrize(("name", "value"), [
    ("DEFAULT_RATE_LIMIT", "lots"), ("DEFAULT_RATE_LIMIT", "0/minute"), ("TOKEN_MAX_TTL", "1w"),
    ("TOKEN_MAX_TTL", "0s"), ("TRUSTED_PROXIES", "yes"), ("TRUSTED_PROXIES", "-1"),
])
def test_other_bad_settings_name_their_variable(name, value):
    config_error({"DATABASE_URL": "memory://", name: value}, "KEYGATE_" + name)


def test_an_initialised_store_url_is_enough(store_url):
    """``create_app`` opens and checks the configured store by itself."""
    s = open_store(store_url)
    s.migrate()
    key = issue_key(s, name="by-url", scopes=["secret:read"]).plaintext
    s.close()
    app = create_app({"DATABASE_URL": store_url})
    try:
        client = app.test_client()
        if store_url == "memory://":  # every memory store starts empty
            problem(client.get("/secret", headers={"API-Key": key}), 401, "invalid_credentials", "/secret")
        else:
            ok(client.get("/secret", headers={"API-Key": key}), "/secret")
    finally:
        shut(app)
        app.extensions["keygate"].store.close()


def test_generated_secret_key_is_private_and_reused(monkeypatch, tmp_path, apps):
    monkeypatch.delenv("KEYGATE_SECRET_KEY")
    instance = tmp_path / "instance"
    path = instance / "secret_key"
    assert not path.exists()
    store = MemoryKeyStore()
    first = create_app({"DATABASE_URL": "memory://"}, store=store)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 32
    assert first.config["SECRET_KEY"] == secret

    second = create_app({"DATABASE_URL": "memory://"}, store=store)
    apps.extend([first, second])
    assert second.config["SECRET_KEY"] == secret
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # What that buys a user: a query token minted before a restart still works after it.
    key = issue_key(store, name="tok", scopes=["data:read"]).plaintext
    minted = first.test_client().post("/tokens", headers={"API-Key": key}, json={})
    assert minted.status_code == 201, minted.get_data(as_text=True)
    resp = second.test_client().get("/data", query_string={"token": minted.get_json()["token"]})
    assert resp.status_code == 200 and resp.get_json()["caller"]["via"] == "token"


def test_a_readable_secret_key_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("KEYGATE_SECRET_KEY")
    create_app({"DATABASE_URL": "memory://"}, store=MemoryKeyStore())
    (tmp_path / "instance" / "secret_key").chmod(0o644)
    config_error({"DATABASE_URL": "memory://"}, "KEYGATE_SECRET_KEY")


def test_an_unreachable_store_at_start_up_is_a_keygate_error():
    """An app over an unreachable store refuses to start with a keygate error, not a driver's."""
    with pytest.raises((StoreUnavailable, ConfigError)):
        create_app({"DATABASE_URL": CLOSED_PG})


# -- issue 12: files only their owner reads ------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_the_instance_directory_and_its_files_are_private(tmp_path, umask, apps, secret_key):
    """Whichever path creates them, with KEYGATE_SECRET_KEY set (no secret file written)."""
    instance = tmp_path / "deep" / "instance"
    db = instance / "keygate.db"
    old = os.umask(umask)
    try:
        store = open_store(f"sqlite:///{db}")
        store.migrate()
        issue_key(store, name="k", scopes=["admin"])  # the WAL exists while a connection is open
        app = create_app({"DATABASE_URL": f"sqlite:///{db}", "INSTANCE_PATH": str(instance),
                          "SECRET_KEY": secret_key})
        apps.append(app)
    finally:
        os.umask(old)
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    files = [p for p in instance.rglob("*")]
    assert {p.name for p in files} >= {"keygate.db", "keygate.db-wal", "keygate.db-shm"}
    assert any(p.name.startswith("ratelimits-") for p in files)
    assert any(p.parent.name == "metrics" for p in files)
    for p in files:
        wanted = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == wanted, (p.name, oct(p.stat().st_mode))
    store.close()


def test_the_instance_files_alone_make_a_private_directory(tmp_path, apps, secret_key):
    old = os.umask(0o022)
    try:
        apps.append(create_app({"DATABASE_URL": "memory://", "INSTANCE_PATH": str(tmp_path / "inst"),
                                "SECRET_KEY": secret_key}, store=MemoryKeyStore()))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "inst").stat().st_mode) == 0o700
    for p in (tmp_path / "inst").rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p.name


# -- issue 12: OPTIONS, CORS and the documentation page -------------------------------------


@pytest.mark.parametrize("path", ["/secret", "/data", "/admin/keys", "/tokens", "/healthz", "/admin/keys/AAAAAAAAAAAA"])
def test_options_is_204_with_allow_and_no_body(mem, path):
    resp = mem.client.options(path)
    assert resp.status_code == 204
    assert resp.get_data() == b"" and "Content-Type" not in resp.headers
    assert "OPTIONS" in resp.headers["Allow"]
    assert not [h for h in resp.headers.keys() if h.startswith("Access-Control-")]  # CORS is off


def test_cors_is_off_by_default(mem):
    key = mem.key("secret:read")
    for resp in (mem.client.get("/secret", headers={"API-Key": key, "Origin": "https://app.example.com"}),
                 mem.client.options("/secret", headers={"Origin": "https://app.example.com",
                                                        "Access-Control-Request-Method": "GET",
                                                        "Access-Control-Request-Headers": "API-Key"})):
        assert not [h for h in resp.headers.keys() if h.startswith("Access-Control-")]


@pytest.fixture
def cors(apps) -> Harness:  # noqa: ANN001
    harness = Harness(MemoryKeyStore(), "memory://",
                      {"CORS_ORIGINS": "https://app.example.com, https://admin.example.com:8443"})
    apps.append(harness.app)
    return harness


def test_a_preflight_from_a_listed_origin_may_send_the_api_key(cors):
    resp = cors.client.options("/secret", headers={
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "api-key"})
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "api-key" in resp.headers["Access-Control-Allow-Headers"].lower()
    assert "GET" in resp.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in resp.headers
    key = cors.key("secret:read")
    real = cors.client.get("/secret", headers={"API-Key": key, "Origin": "https://app.example.com"})
    assert real.status_code == 200 and real.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "RateLimit" in real.headers["Access-Control-Expose-Headers"]
    refused = cors.client.get("/secret", headers={"Origin": "https://app.example.com"})
    assert refused.status_code == 401 and "WWW-Authenticate" in refused.headers["Access-Control-Expose-Headers"]


def test_a_preflight_from_an_unlisted_origin_gets_no_cors_headers(cors):
    for origin in ("https://evil.example.com", "https://app.example.com.evil.example", "null",
                   "http://app.example.com"):
        resp = cors.client.options("/secret", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "api-key"})
        assert resp.status_code == 204
        assert not [h for h in resp.headers.keys() if h.startswith("Access-Control-")], origin
        key = cors.key("secret:read")
        resp = cors.client.get("/secret", headers={"API-Key": key, "Origin": origin})
        assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("origins", ["*", "app.example.com", "https://app.example.com/path", "https://*.example.com"])
def test_bad_cors_origins_name_the_variable(origins):
    config_error({"DATABASE_URL": "memory://", "CORS_ORIGINS": origins}, "KEYGATE_CORS_ORIGINS")


def test_the_docs_page_has_a_csp_that_lets_only_its_own_scripts_run(mem):
    import base64
    import hashlib

    resp = mem.client.get("/docs")
    csp = resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["frame-ancestors"] == "'none'" and directives["default-src"] == "'none'"
    assert "unsafe-inline" not in directives["script-src"] and "unsafe-eval" not in directives["script-src"]
    html = resp.get_data(as_text=True)
    inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, re.S)
    assert inline, "the page's inline script"
    for script in inline:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in directives["script-src"]
    for src in re.findall(r'<script[^>]*src="([^"]+)"', html):
        assert src.startswith("/"), src  # served by keygate itself


def test_the_served_document_states_this_servers_token_ttl(apps):
    harness = Harness(MemoryKeyStore(), "memory://", {"TOKEN_MAX_TTL": "1h"})
    apps.append(harness.app)
    doc = harness.client.get("/openapi.json").get_json()
    assert doc["components"]["schemas"]["TokenRequest"]["properties"]["ttl"]["maximum"] == 3600
    key = harness.key("data:read")
    assert harness.client.post("/tokens", headers={"API-Key": key}, json={"ttl": 3600}).status_code == 201
    assert harness.client.post("/tokens", headers={"API-Key": key}, json={"ttl": 3601}).status_code == 400


def test_no_store_replaces_a_views_own_cache_control(make_app) -> None:  # noqa: ANN001
    """An authenticated answer is never cacheable, whatever its view said (one header, the
    strict one); an unauthenticated view keeps its own."""
    from flask import Response

    store = MemoryKeyStore()
    app = make_app(store)
    auth = app.extensions["keygate"].auth

    @app.get("/cached-report")
    @auth.require("secret:read")
    def cached_report() -> Response:
        return Response("{}", headers={"Cache-Control": "public, max-age=600"}, mimetype="application/json")

    @app.get("/cached-public")
    def cached_public() -> Response:
        return Response("{}", headers={"cache-control": "public, max-age=600"}, mimetype="application/json")

    key = issue_key(store, name="reader", scopes=["secret:read"]).plaintext
    client = app.test_client()
    resp = client.get("/cached-report", headers={"API-Key": key})
    assert resp.status_code == 200
    assert resp.headers.getlist("Cache-Control") == ["no-store"]
    assert client.get("/cached-public").headers.getlist("Cache-Control") == ["public, max-age=600"]


def test_async_and_plain_views_both_answer_every_time(make_app) -> None:  # noqa: ANN001
    """keygate's app remembers which views and hooks are synchronous (a shortcut past Flask's
    check on every call): ``async def`` views and hooks added to it (functions and bound
    methods alike) still run, request after request."""
    from flask import g

    app = make_app(MemoryKeyStore())

    class Hooks:
        def plain(self) -> None:
            g.seen = [*g.get("seen", []), "plain"]

        async def coroutine(self) -> None:
            g.seen = [*g.get("seen", []), "async"]

    hooks = Hooks()
    app.before_request(hooks.plain)
    app.before_request(hooks.coroutine)

    @app.get("/slow")
    async def slow() -> dict[str, object]:
        return {"kind": "async", "hooks": g.seen}

    @app.get("/quick")
    def quick() -> dict[str, object]:
        return {"kind": "plain", "hooks": g.seen}

    client = app.test_client()
    for _ in range(3):
        assert client.get("/slow").get_json() == {"kind": "async", "hooks": ["plain", "async"]}
        assert client.get("/quick").get_json() == {"kind": "plain", "hooks": ["plain", "async"]}
