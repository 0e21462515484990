"""Query tokens: minting (POST /tokens, ``manage.py mint-token``), using them in
``/data?token=…``, and everything that must kill or refuse them.

Most cases run in-process through the Flask test client, over every store
backend where the store matters (a token dies with its key's generation, which
lives in the store). Restarts, signing-secret rotation and the access log are
checked on real ``manage.py serve`` processes.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from itsdangerous import URLSafeTimedSerializer

import keys.tokens
from conftest import allow_refused_credentials, assert_one_line_failure, invoke_cli, strong_secret
from keys import InvalidToken, TokenExpired, generate_key, issue_key
from keys.tokens import TokenSigner

PROBLEM = "application/problem+json"
MEMORY_ONLY = pytest.mark.parametrize("store_url", ["memory://"], ids=["memory"])
# A token is ``key_id.generation.expires_at.scopes.signature`` (see keys/tokens.py).
TOKEN_RE = re.compile(r"[0-9A-Za-z]{12}\.\d+\.\d{10}\.[\w-]+\.[\w-]{43}")
# What is left of any token, even a tampered one: ``.generation.expires_at.``
TOKEN_TRACE_RE = re.compile(r"\.\d+\.\d{10}\.")


# -- helpers ------------------------------------------------------------------------------------

def iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def problem(resp, status: int, code: str) -> dict:
    """Assert a problem+json answer with this status and code; return its body."""
    body = resp.get_data(as_text=True) if hasattr(resp, "get_data") else resp.text
    assert resp.status_code == status, body
    assert resp.headers["Content-Type"].startswith(PROBLEM), resp.headers
    data = json.loads(body)
    assert data["status"] == status and data["code"] == code, data
    assert {"type", "title", "status", "detail", "code", "instance"} <= set(data)
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith('ApiKey realm="keygate"')
    if status in (401, 403):
        assert resp.headers["Cache-Control"] == "no-store"
    return data


def flip(token: str, index: int) -> str:
    """``token`` with one character changed (a middle one: every bit of it is significant)."""
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1:]


def header(issued) -> dict[str, str]:  # noqa: ANN001
    return {"API-Key": issued.plaintext}


def mint(client, issued, status: int = 201, **body) -> dict:  # noqa: ANN001
    resp = client.post("/tokens", headers=header(issued), json=body)
    assert resp.status_code == status, resp.get_data(as_text=True)
    return resp.get_json()


def get_data(client, token: str):  # noqa: ANN001, ANN201
    return client.get("/data", query_string={"token": token})


@pytest.fixture
def reader(store):  # noqa: ANN001, ANN201
    return issue_key(store, name="reader", scopes=["secret:read", "data:read"])


# -- the happy path and where a token may go -----------------------------------------------------

def test_data_read_token_opens_data_and_nothing_else(client, reader):
    before = time.time()
    minted = mint(client, reader, scopes=["data:read"], ttl=60)
    assert set(minted) == {"token", "expires_at", "scopes"}
    assert minted["scopes"] == ["data:read"]
    assert before + 59 <= iso(minted["expires_at"]) <= time.time() + 61
    token = minted["token"]

    resp = get_data(client, token)
    assert resp.status_code == 200
    assert resp.get_json()["message"] == "Here is your data."
    assert resp.get_json()["caller"] == {"id": reader.record.id, "name": "reader",
                                         "scopes": ["data:read"], "via": "token"}
    assert resp.headers["Cache-Control"] == "no-store"

    # The parent key holds secret:read, but a token never opens /secret.
    detail = problem(client.get("/secret", query_string={"token": token}), 403, "insufficient_scope")["detail"]
    assert "secret:read" in detail
    problem(client.get("/admin", query_string={"token": token}), 403, "insufficient_scope")


def test_token_defaults_to_the_keys_scopes_and_900_seconds(client, reader):
    before = time.time()
    minted = mint(client, reader)
    assert minted["scopes"] == ["secret:read", "data:read"]
    assert before + 899 <= iso(minted["expires_at"]) <= time.time() + 901
    assert get_data(client, minted["token"]).status_code == 200


@MEMORY_ONLY
def test_a_narrowed_token_without_data_read_is_refused_on_data(client, reader):
    token = mint(client, reader, scopes=["secret:read"])["token"]
    detail = problem(get_data(client, token), 403, "insufficient_scope")["detail"]
    assert "data:read" in detail


@MEMORY_ONLY
def test_tokens_are_refused_off_data_even_with_admin_scope(client, admin, reader):
    token = mint(client, admin)["token"]
    assert get_data(client, token).status_code == 200  # admin opens every scope, /data included
    q = {"token": token}
    for path in ["/secret", "/admin", "/admin/keys", f"/admin/keys/{reader.record.id}", "/admin/audit"]:
        problem(client.get(path, query_string=q), 403, "insufficient_scope")
    problem(client.post("/admin/keys", query_string=q, json={"name": "x", "scopes": ["admin"]}),
            403, "insufficient_scope")
    problem(client.delete(f"/admin/keys/{reader.record.id}", query_string=q), 403, "insufficient_scope")
    problem(client.post(f"/admin/keys/{reader.record.id}/rotate", query_string=q), 403, "insufficient_scope")
    problem(client.post("/tokens", query_string=q, json={}), 403, "insufficient_scope")  # no token from a token
    # Nothing happened to the key the token tried to manage.
    assert client.get(f"/admin/keys/{reader.record.id}", headers=header(admin)).get_json()["revoked_at"] is None
    assert len(client.get("/admin/keys", headers=header(admin)).get_json()["keys"]) == 2


@MEMORY_ONLY
def test_a_raw_api_key_in_the_url_is_refused(client, reader):
    for path in ["/data", "/secret"]:
        data = problem(client.get(path, query_string={"token": reader.plaintext}), 401, "invalid_token")
        assert reader.plaintext not in json.dumps(data)
    assert 'error="invalid_token"' in client.get("/data", query_string={"token": reader.plaintext}) \
        .headers["WWW-Authenticate"]
    # A key-shaped value that is not a real key gets the same answer.
    problem(get_data(client, generate_key().plaintext), 401, "invalid_token")


@MEMORY_ONLY
def test_header_and_token_together_are_ambiguous(client, reader):
    token = mint(client, reader)["token"]
    for path in ["/data", "/secret", "/admin/keys"]:
        problem(client.get(path, headers=header(reader), query_string={"token": token}),
                400, "multiple_credentials")
    # ... even when one of them is bad: the request is refused before either is checked.
    problem(client.get("/data", headers={"API-Key": "nonsense"}, query_string={"token": token}),
            400, "multiple_credentials")


# -- tampering and expiry ----------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@MEMORY_ONLY
def test_a_tampered_token_is_invalid(client, reader):
    allow_refused_credentials(client.application)  # dozens of forged tokens on purpose
    token = mint(client, reader, scopes=["data:read"])["token"]
    assert TOKEN_RE.fullmatch(token), token  # URL-safe: nothing to percent-encode
    key_id, generation, expires_at, scopes, signature = token.split(".")
    assert key_id == reader.record.id and base64.urlsafe_b64decode(scopes + "==") == b"data:read"
    body = token.rsplit(".", 1)[0]
    other = mint(client, issue_key(client.application.extensions["keygate"].store,
                                   name="other", scopes=["data:read"]))["token"]
    tampered = {
        "key id": flip(token, 5),
        "generation": f"{key_id}.1.{expires_at}.{scopes}.{signature}",
        "expiry pushed back": f"{key_id}.{generation}.{int(expires_at) + 3600}.{scopes}.{signature}",
        "scopes widened": f"{key_id}.{generation}.{expires_at}.{b64('data:read secret:read admin')}.{signature}",
        "scopes flipped": flip(token, len(body) - 2),
        "signature": flip(token, len(body) + 20),
        "signature start": flip(token, len(body) + 1),
        "truncated": token[:-4],
        "no signature": body,
        "empty signature": body + ".",
        "extended": token + "A",
        "extra field": f"{key_id}.x.{generation}.{expires_at}.{scopes}.{signature}",
        "garbage": "not-a-token",
        "dots": "....",
        "empty": "",
        "huge": "A" * 5000,
        # Another key's payload spliced onto this token's signature, and the other way round.
        "spliced": other.rsplit(".", 1)[0] + "." + signature,
        "spliced signature": body + "." + other.rsplit(".", 1)[1],
        # The first token format (itsdangerous' URLSafeTimedSerializer, salt v1), same secret.
        "v1 format": URLSafeTimedSerializer(client.application.config["SECRET_KEY"], salt="keygate.query-token.v1")
        .dumps({"k": key_id, "s": "data:read", "g": 0, "e": int(expires_at)}),
    }
    for what, value in tampered.items():
        assert value != token
        data = problem(get_data(client, value), 401, "invalid_token")
        assert 'error="invalid_token"' in get_data(client, value).headers["WWW-Authenticate"], what
        if value:
            assert value not in json.dumps(data), what  # a refusal never echoes the credential
    assert get_data(client, token).status_code == 200  # the original still works


def test_a_validly_signed_payload_of_another_shape_is_refused(store, secret_key, reader):
    """Only ``TokenSigner`` signs with its salt, but a payload it can't read is refused, not a 500."""
    signer = TokenSigner([secret_key])
    good = f"{reader.record.id}.0.{int(time.time()) + 60}.{b64('data:read')}"
    assert signer.verify(store, signer._signer.sign(good).decode()).key_id == reader.record.id
    for payload in ["", "x", "a.b.c", f"{reader.record.id}.zero.1.{b64('data:read')}",
                    f"{reader.record.id}.0.soon.{b64('data:read')}", f"{reader.record.id}.0.1.%%%",
                    f"{reader.record.id}.0.{int(time.time()) + 60}.{b64('x')}\xff",
                    f"{reader.record.id}.0.{int(time.time()) + 60}.{b64('nope')}.extra"]:
        with pytest.raises((InvalidToken, TokenExpired)):
            signer.verify(store, signer._signer.sign(payload).decode())


def test_a_token_longer_lived_than_the_current_cap_is_refused(store, secret_key, reader):
    """Lowering KEYGATE_TOKEN_MAX_TTL retires the tokens minted under the higher cap."""
    long_lived = TokenSigner([secret_key], max_ttl=86400).mint(reader.record, ttl=86400).token
    assert TokenSigner([secret_key], max_ttl=86400).verify(store, long_lived).key_id == reader.record.id
    with pytest.raises(InvalidToken):
        TokenSigner([secret_key], max_ttl=3600).verify(store, long_lived)


@MEMORY_ONLY
def test_a_token_signed_with_another_secret_is_invalid(client, reader):
    forged = TokenSigner([secrets.token_urlsafe(48)]).mint(reader.record, ["data:read"], 60).token
    problem(get_data(client, forged), 401, "invalid_token")


@MEMORY_ONLY
def test_a_token_for_an_unknown_key_is_invalid(client, secret_key, reader):
    ghost = reader.record.replace(id=generate_key().key_id)  # signed with the real secret, no such key
    token = TokenSigner([secret_key]).mint(ghost, ["data:read"], 60).token
    problem(get_data(client, token), 401, "invalid_token")


@MEMORY_ONLY
def test_a_token_expires_after_its_ttl(client, reader, monkeypatch):
    minted = mint(client, reader, scopes=["data:read"], ttl=1)
    assert get_data(client, minted["token"]).status_code == 200
    later = iso(minted["expires_at"]) + 1
    monkeypatch.setattr(keys.tokens, "time", SimpleNamespace(time=lambda: later))
    data = problem(get_data(client, minted["token"]), 401, "token_expired")
    assert data["title"]
    assert 'error="invalid_token"' in get_data(client, minted["token"]).headers["WWW-Authenticate"]


def test_token_expiry_is_exact_at_the_signer(store, secret_key, reader):
    signer = TokenSigner([secret_key], max_ttl=3600)
    t0 = 1_900_000_000.0
    minted = signer.mint(reader.record, ["data:read"], ttl=60, now=t0)
    assert minted.expires_at == t0 + 60
    assert signer.verify(store, minted.token, now=t0 + 59).scopes == ("data:read",)
    with pytest.raises(TokenExpired):
        signer.verify(store, minted.token, now=t0 + 60)
    with pytest.raises(TokenExpired):
        signer.verify(store, minted.token, now=t0 + 10 * 86400)


# -- the parent key's fate is the token's -----------------------------------------------------

def test_revoking_the_key_kills_its_tokens(client, admin, reader):
    token = mint(client, reader, scopes=["data:read"])["token"]
    other = issue_key(client.application.extensions["keygate"].store, name="other", scopes=["data:read"])
    other_token = mint(client, other)["token"]
    assert get_data(client, token).status_code == 200

    assert client.delete(f"/admin/keys/{reader.record.id}", headers=header(admin)).status_code == 204
    problem(get_data(client, token), 401, "invalid_token")
    problem(client.post("/tokens", headers=header(reader), json={}), 401, "key_revoked")
    assert get_data(client, other_token).status_code == 200  # only that key's tokens die


@pytest.mark.parametrize("grace", [None, "1h"], ids=["no-grace", "grace"])
def test_rotating_the_key_kills_its_tokens_with_or_without_grace(client, admin, reader, grace):
    token = mint(client, reader, scopes=["data:read"])["token"]
    body = {} if grace is None else {"grace": grace}
    resp = client.post(f"/admin/keys/{reader.record.id}/rotate", headers=header(admin), json=body)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    new_key = resp.get_json()["key"]

    problem(get_data(client, token), 401, "invalid_token")
    old_key_data = client.get("/data", headers=header(reader))
    if grace is None:
        problem(old_key_data, 401, "key_revoked")
    else:  # the old key itself lives on through the grace period; its old tokens do not
        assert old_key_data.status_code == 200
        # A token minted from the old key during the grace period works...
        fresh = mint(client, reader, scopes=["data:read"])["token"]
        assert get_data(client, fresh).status_code == 200
    new_token = client.post("/tokens", headers={"API-Key": new_key}, json={"scopes": ["data:read"]})
    assert get_data(client, new_token.get_json()["token"]).status_code == 200


def test_a_token_from_an_expiring_key_dies_with_the_key(store, secret_key, make_app, monkeypatch):
    issued = issue_key(store, name="brief", scopes=["data:read"], expires_in=120)
    client = make_app(store, TOKEN_MAX_TTL="1h").test_client()
    token = mint(client, issued, ttl=3600)["token"]
    assert get_data(client, token).status_code == 200
    later = issued.record.expires_at + 1
    monkeypatch.setattr(keys.tokens, "time", SimpleNamespace(time=lambda: later))
    problem(get_data(client, token), 401, "invalid_token")


# -- signing-secret rotation (in-process) ----------------------------------------------------------

@MEMORY_ONLY
def test_signing_secret_rotation(store, make_app, reader, monkeypatch):
    old, new = strong_secret(), strong_secret()
    monkeypatch.setenv("KEYGATE_SECRET_KEY", old)
    before = make_app(store).test_client()
    old_token = mint(before, reader)["token"]

    monkeypatch.setenv("KEYGATE_SECRET_KEY", f"{new},{old}")
    during = make_app(store).test_client()
    assert get_data(during, old_token).status_code == 200  # old secret listed second still verifies
    new_token = mint(during, reader)["token"]
    assert get_data(during, new_token).status_code == 200

    monkeypatch.setenv("KEYGATE_SECRET_KEY", new)
    after = make_app(store).test_client()
    assert get_data(after, new_token).status_code == 200  # signed with the first secret
    problem(get_data(after, old_token), 401, "invalid_token")
    problem(get_data(before, new_token), 401, "invalid_token")


# -- POST /tokens: bad bodies -------------------------------------------------------------------

BAD_BODIES = [
    ("invalid JSON", '{"ttl": 60', "body"),
    ("JSON null", "null", "body"),
    ("array body", '["data:read"]', "body"),
    ("string body", '"data:read"', "body"),
    ("absurd nesting", "[" * 50_000, "body"),
    ("not UTF-8", b'{"scopes": ["\xff"]}', "body"),
    ("scopes as a string", '{"scopes": "data:read"}', "scopes"),
    ("scopes of numbers", '{"scopes": [1]}', "scopes"),
    ("scopes as an object", '{"scopes": {"data:read": true}}', "scopes"),
    ("empty scopes", '{"scopes": []}', "scopes"),
    ("unknown scope", '{"scopes": ["data:write"]}', "scopes"),
    ("ttl as a word", '{"ttl": "a minute"}', "ttl"),
    ("ttl as text over the cap", '{"ttl": "2h"}', "ttl"),
    ("ttl as a boolean", '{"ttl": true}', "ttl"),
    ("fractional ttl", '{"ttl": 1.5}', "ttl"),
    ("ttl as a list", '{"ttl": [60]}', "ttl"),
    ("negative ttl", '{"ttl": -60}', "ttl"),
    ("zero ttl", '{"ttl": 0}', "ttl"),
    ("ttl over the cap", '{"ttl": 3601}', "ttl"),
    ("enormous ttl", '{"ttl": 1e400}', "ttl"),
    ("unknown field", '{"scope": ["data:read"]}', "scope"),
    ("another unknown field", '{"ttl": 60, "key_id": "x"}', "key_id"),
]


@MEMORY_ONLY
@pytest.mark.parametrize("body,field", [(b, f) for _, b, f in BAD_BODIES], ids=[w for w, _, _ in BAD_BODIES])
def test_bad_token_bodies_are_400_naming_the_field(store, make_app, reader, body, field):
    client = make_app(store, TOKEN_MAX_TTL="1h").test_client()
    resp = client.post("/tokens", headers=header(reader), data=body, content_type="application/json")
    data = problem(resp, 400, "invalid_request")
    assert field in data["detail"], data
    assert [e for e in store.events() if e.event == "mint_token"] == []  # nothing was minted


@MEMORY_ONLY
def test_token_ttl_cap_comes_from_configuration(store, make_app, reader):
    client = make_app(store, TOKEN_MAX_TTL="1h").test_client()
    assert "3600" in problem(client.post("/tokens", headers=header(reader), json={"ttl": 3601}),
                             400, "invalid_request")["detail"]
    before = time.time()
    at_cap = mint(client, reader, ttl=3600)
    assert before + 3599 <= iso(at_cap["expires_at"]) <= time.time() + 3601
    # With a cap under the 900 s default, the default shrinks to the cap rather than failing.
    short = make_app(store, TOKEN_MAX_TTL="60s").test_client()
    assert iso(mint(short, reader)["expires_at"]) <= time.time() + 61


@MEMORY_ONLY
def test_a_ttl_is_seconds_or_a_duration(client, reader):
    """As everywhere a duration is taken: ``300``, ``"300"`` and ``"5m"`` are the same."""
    for ttl in (300, "300", "5m", " 5m "):
        before = time.time()
        minted = mint(client, reader, ttl=ttl)
        assert before + 299 <= iso(minted["expires_at"]) <= time.time() + 301, ttl


@MEMORY_ONLY
def test_scopes_the_key_does_not_hold_are_403(client, store):
    data_only = issue_key(store, name="d", scopes=["data:read"])
    for scopes in (["admin"], ["secret:read"], ["data:read", "secret:read"]):
        resp = client.post("/tokens", headers=header(data_only), json={"scopes": scopes})
        detail = problem(resp, 403, "insufficient_scope")["detail"]
        assert ("admin" if scopes == ["admin"] else "secret:read") in detail
    # Duplicates and a key's own scopes are fine.
    assert mint(client, data_only, scopes=["data:read", "data:read"])["scopes"] == ["data:read"]


@MEMORY_ONLY
def test_minting_needs_a_valid_key_in_the_header(client, store, reader):
    problem(client.post("/tokens", json={}), 401, "missing_credentials")
    problem(client.post("/tokens", headers={"API-Key": generate_key().plaintext}, json={}),
            401, "invalid_credentials")
    expired = issue_key(store, name="old", scopes=["data:read"], expires_in=60, now=time.time() - 120)
    problem(client.post("/tokens", headers=header(expired), json={}), 401, "key_expired")
    problem(client.get("/tokens", headers=header(reader)), 405, "method_not_allowed")


# -- manage.py mint-token -----------------------------------------------------------------------


def assert_clean_failure(proc, *, names: str) -> None:  # noqa: ANN001
    assert_one_line_failure(proc, names=names)
    assert not TOKEN_TRACE_RE.search(proc.stdout + proc.stderr)  # no token was printed


def test_mint_token_cli(env, cli_store, make_app):
    key = issue_key(cli_store, name="cli", scopes=["secret:read", "data:read"])
    client = make_app(cli_store).test_client()

    before = time.time()
    proc = invoke_cli(env, "mint-token", key.record.id, "--scope", "data:read", "--ttl", "90s", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"token", "expires_at", "scopes"}
    assert out["scopes"] == ["data:read"]
    assert before + 89 <= iso(out["expires_at"]) <= time.time() + 91
    assert get_data(client, out["token"]).status_code == 200
    problem(client.get("/secret", query_string={"token": out["token"]}), 403, "insufficient_scope")

    # Without --json: the token alone on stdout (pipe-friendly), the explanation on stderr.
    proc = invoke_cli(env, "mint-token", key.record.id)
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert "\n" not in token and TOKEN_RE.fullmatch(token) and token.startswith(key.record.id)
    assert token not in proc.stderr and key.plaintext not in proc.stdout + proc.stderr
    caller = get_data(client, token).get_json()["caller"]
    assert caller["scopes"] == ["secret:read", "data:read"] and caller["via"] == "token"


def test_mint_token_cli_refusals(env, cli_store):
    key = issue_key(cli_store, name="cli", scopes=["data:read"])
    revoked = issue_key(cli_store, name="gone", scopes=["data:read"])
    cli_store.revoke(revoked.record.id, time.time())
    capped = {**env, "KEYGATE_TOKEN_MAX_TTL": "1h"}

    assert_clean_failure(invoke_cli(capped, "mint-token", key.record.id, "--ttl", "2h"), names="ttl")
    assert_clean_failure(invoke_cli(env, "mint-token", key.record.id, "--ttl", "25h"), names="ttl")  # default cap 24h
    assert_clean_failure(invoke_cli(env, "mint-token", key.record.id, "--ttl", "soon"), names="ttl")
    assert_clean_failure(invoke_cli(env, "mint-token", key.record.id, "--scope", "secret:read"), names="secret:read")
    assert_clean_failure(invoke_cli(env, "mint-token", generate_key().key_id), names="no key")
    assert_clean_failure(invoke_cli(env, "mint-token", revoked.record.id), names="revoked")
    assert [e for e in cli_store.events() if e.event == "mint_token"] == []


# -- real servers -------------------------------------------------------------------------------

def cli_json(env, *args: str) -> dict:  # noqa: ANN001
    proc = invoke_cli(env, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def server_mint(server, key: str, **body) -> str:  # noqa: ANN001
    resp = server.request("POST", "/tokens", headers={"API-Key": key}, json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()["token"]


def server_data(server, token: str):  # noqa: ANN001, ANN201
    return server.get("/data", params={"token": token})


@pytest.mark.slow
def test_tokens_survive_a_restart_and_a_signing_secret_rotation(env, start_server, secret_key):
    key = cli_json(env, "init")["admin_key"]["key"]  # any valid key may mint
    old, new = secret_key, strong_secret()

    first = start_server()
    old_token = server_mint(first, key, scopes=["data:read"], ttl=600)
    assert server_data(first, old_token).status_code == 200
    first.stop()

    restarted = start_server()  # same store, same secret: the token lives on
    assert server_data(restarted, old_token).status_code == 200

    rotating = start_server(env_overrides={"KEYGATE_SECRET_KEY": f"{new},{old}"})
    assert server_data(rotating, old_token).status_code == 200  # old secret, listed second
    new_token = server_mint(rotating, key, scopes=["data:read"])
    assert server_data(rotating, new_token).status_code == 200
    problem(server_data(restarted, new_token), 401, "invalid_token")  # it was signed with "new"

    rotated = start_server(env_overrides={"KEYGATE_SECRET_KEY": new})
    assert server_data(rotated, new_token).status_code == 200
    problem(server_data(rotated, old_token), 401, "invalid_token")  # "old" retired


@pytest.mark.slow
def test_a_whole_server_run_never_prints_a_key_or_token(env, start_server):
    issued: list[str] = []  # every key and token this run creates

    def remember(value: str) -> str:
        issued.append(value)
        return value

    admin = remember(cli_json(env, "init")["admin_key"]["key"])
    reader = cli_json(env, "create-key", "--name", "reader", "--scope", "data:read", "--scope", "secret:read")
    remember(reader["key"])
    writer = cli_json(env, "create-key", "--name", "writer", "--scope", "secret:read")
    remember(writer["key"])
    cli_token = remember(cli_json(env, "mint-token", reader["id"], "--scope", "data:read")["token"])

    server = start_server()
    A = {"API-Key": admin}
    created = server.request("POST", "/admin/keys", headers=A, json={"name": "api", "scopes": ["data:read"]})
    assert created.status_code == 201
    api_key = remember(created.json()["key"])
    token = remember(server_mint(server, reader["key"], scopes=["data:read"]))
    api_token = remember(server_mint(server, api_key))

    assert server_data(server, token).status_code == 200
    assert server_data(server, cli_token).status_code == 200
    assert server.get("/data", params={"x": "1", "token": api_token}).status_code == 200
    assert server.get(f"/data?token={token}&x=1").status_code == 200
    problem(server.get("/secret", params={"token": token}), 403, "insufficient_scope")
    problem(server_data(server, flip(token, 10)), 401, "invalid_token")
    problem(server_data(server, reader["key"]), 401, "invalid_token")  # a raw key in a URL
    problem(server.get("/data", params={"api_key": reader["key"]}), 401, "missing_credentials")
    problem(server.get("/nowhere", params={"token": token}), 404, "not_found")
    problem(server.get("/data", params={"token": token}, headers={"API-Key": reader["key"]}),
            400, "multiple_credentials")

    rotated = server.request("POST", f"/admin/keys/{created.json()['id']}/rotate", headers=A, json={})
    assert rotated.status_code == 201
    remember(rotated.json()["key"])
    problem(server_data(server, api_token), 401, "invalid_token")
    assert server.request("DELETE", f"/admin/keys/{reader['id']}", headers=A).status_code == 204
    problem(server_data(server, token), 401, "invalid_token")
    problem(server_data(server, cli_token), 401, "invalid_token")

    cli_rotated = remember(cli_json(env, "rotate-key", writer["id"])["key"])
    assert server.get("/secret", headers={"API-Key": cli_rotated}).status_code == 200
    problem(server.get("/secret", headers={"API-Key": writer["key"]}), 401, "key_revoked")
    remember(server_mint(server, cli_rotated))

    assert len(issued) == 10
    server.stop()  # clean shutdown: workers flush and log their last lines
    output = server.log_path.read_text(errors="replace")
    assert "GET /data?token=[REDACTED]" in output  # the access log ran, redacted
    assert "x=1&token=[REDACTED]" in output and "token=[REDACTED]&x=1" in output
    for value in issued:
        assert value not in output
        assert value[-20:] not in output  # not even a recognisable piece of it
    assert not re.search(r"token=(?!\[REDACTED\])", output)
    assert not re.search(r"kg_[0-9A-Za-z]{8,}", output)
    assert not TOKEN_TRACE_RE.search(output)  # no token, tampered or not


# -- reading the token out of the query string -------------------------------------------------

QUERY_CHARS = "aZ09-_.~=&+%;: \x00é" + "%2B%26%3D%41%zz"


@given(st.text(alphabet=QUERY_CHARS, max_size=40).map(lambda s: "token=" + s)
       | st.text(alphabet=QUERY_CHARS, max_size=40))
@settings(max_examples=500, deadline=None)
def test_the_token_is_read_from_the_query_exactly_as_werkzeug_parses_it(query):
    """``QueryToken.extract`` skips werkzeug's query parsing for a bare ``token=…``; the
    shortcut must never give another answer than the parse it skips."""
    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from keys.auth import QueryToken

    environ = EnvironBuilder(path="/data").get_environ()
    environ["QUERY_STRING"] = query.encode("utf-8").decode("latin-1")  # as a WSGI server gives it
    source = QueryToken(TokenSigner(["s" * 32]))
    expected = Request(dict(environ)).args.get("token") if query else None
    assert source.extract(Request(dict(environ))) == expected
