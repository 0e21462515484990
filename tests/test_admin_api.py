"""The key-management API under /admin/keys, and key rotation over the API and the CLI.

In-process through the Flask test client, over every store backend where the
store matters; ``manage.py rotate-key`` runs in-process (click's CliRunner) against the
SQLite store that an in-process app then serves from.
"""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import pytest

import keys.model
import keys.verify
from api import create_app
from conftest import assert_one_line_failure, invoke_cli, iso
from keys import KeyRevoked, generate_key, hash_key, issue_key, verify_key

PROBLEM = "application/problem+json"
MEMORY_ONLY = pytest.mark.parametrize("store_url", ["memory://"], ids=["memory"])
# What the contract promises in every metadata object (the code may add more).
METADATA = {"id", "name", "scopes", "state", "created_at", "expires_at", "revoked_at", "last_used_at",
            "rate_limit", "allowed_ips"}
STATES = {"active", "grace", "revoked", "expired"}


def problem(resp, status: int, code: str) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    data = resp.get_json()
    assert data["status"] == status and data["code"] == code, data
    assert {"type", "title", "status", "detail", "code", "instance"} <= set(data)
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith('ApiKey realm="keygate"')
    return data


def assert_metadata(meta: dict, *, with_key: bool = False) -> None:
    """Contract fields present; the key only when asked for; nothing hash-like ever."""
    assert METADATA <= set(meta), meta
    assert ("key" in meta) == with_key, meta
    assert not [k for k in meta if "hash" in k or "secret" in k], meta
    for field in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        assert meta[field] is None or meta[field].endswith("Z"), meta  # ISO 8601 UTC or null
    iso(meta["created_at"])
    assert meta["state"] in STATES and isinstance(meta["rate_limit"], str), meta  # the limit in force


def assert_no_secrets(text: str, store) -> None:  # noqa: ANN001
    """No key hash of any stored key appears in ``text``."""
    after = None
    while page := store.list_keys(limit=500, after=after):
        for record in page:
            assert record.key_hash not in text
        after = page[-1].id


# -- create ------------------------------------------------------------------------------------

def test_create_shows_the_key_once(client, store, A):
    before = time.time()
    resp = client.post("/admin/keys", headers=A, json={
        "name": "billing export", "scopes": ["data:read", "secret:read"], "expires_in": "30d",
        "rate_limit": "10/second", "allowed_ips": ["127.0.0.0/8", "2001:db8::/32", "10.1.2.3"],
    })
    assert resp.status_code == 201, resp.get_data(as_text=True)
    created = resp.get_json()
    assert_metadata(created, with_key=True)
    assert resp.headers["Location"].endswith(f"/admin/keys/{created['id']}")
    assert resp.headers["Cache-Control"] == "no-store"
    plaintext = created["key"]
    assert created["name"] == "billing export"
    assert created["scopes"] == ["secret:read", "data:read"]
    assert created["rate_limit"] == "10/second"
    assert created["allowed_ips"] == ["127.0.0.0/8", "2001:db8::/32", "10.1.2.3/32"]
    assert before - 1 <= iso(created["created_at"]) <= time.time() + 1
    assert iso(created["expires_at"]) - iso(created["created_at"]) == 30 * 86400
    assert created["revoked_at"] is None and created["last_used_at"] is None
    assert plaintext.startswith("kg_") and created["id"] in plaintext

    # The key works at once, for its scopes only.
    ok = client.get("/secret", headers={"API-Key": plaintext})
    assert ok.status_code == 200 and ok.get_json()["caller"]["id"] == created["id"]
    problem(client.get("/admin", headers={"API-Key": plaintext}), 403, "insufficient_scope")

    # ... and is never shown again, nor its hash.
    shown = client.get(f"/admin/keys/{created['id']}", headers=A)
    assert shown.status_code == 200
    assert_metadata(shown.get_json())
    assert {k: v for k, v in shown.get_json().items() if k not in ("last_used_at", "use_count")} == \
        {k: v for k, v in created.items() if k not in ("key", "last_used_at", "use_count")}
    listed = client.get("/admin/keys", headers=A)
    for body in (shown.get_data(as_text=True), listed.get_data(as_text=True)):
        assert plaintext not in body and plaintext[-38:] not in body
        assert hash_key(plaintext) not in body
        assert_no_secrets(body, store)
    for meta in listed.get_json()["keys"]:
        assert_metadata(meta)


@MEMORY_ONLY
def test_create_defaults(client, A):
    created = client.post("/admin/keys", headers=A, json={"name": "  minimal  ", "scopes": ["admin"]}).get_json()
    assert created["name"] == "minimal"
    assert created["expires_at"] is None and created["allowed_ips"] == []
    assert created["rate_limit"] == "600/minute" and created["state"] == "active"  # the default, in force
    # Explicit nulls are the same as leaving the fields out.
    nulls = client.post("/admin/keys", headers=A, json={
        "name": "nulls", "scopes": ["data:read"], "expires_in": None, "rate_limit": None, "allowed_ips": None})
    assert nulls.status_code == 201 and nulls.get_json()["expires_at"] is None
    # expires_in as seconds, a number or text alike.
    for seconds in (90, "90", " 90 "):
        secs = client.post("/admin/keys", headers=A, json={"name": "s", "scopes": ["data:read"], "expires_in": seconds})
        meta = secs.get_json()
        assert iso(meta["expires_at"]) - iso(meta["created_at"]) == 90, seconds


@MEMORY_ONLY
def test_state_follows_the_key_through_its_life(client, store, A, make_app, monkeypatch):
    """active → grace (rotated with a grace period) → revoked; expired; the default limit in
    force shown, a configured one too."""
    def state(key_id: str) -> str:
        return client.get(f"/admin/keys/{key_id}", headers=A).get_json()["state"]

    old = issue_key(store, name="service", scopes=["secret:read"])
    assert state(old.record.id) == "active"
    new = client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={"grace": "1h"}).get_json()
    assert state(old.record.id) == "grace" and new["state"] == "active"
    listed = {k["id"]: k["state"] for k in client.get("/admin/keys", headers=A).get_json()["keys"]}
    assert listed[old.record.id] == "grace"
    client.delete(f"/admin/keys/{old.record.id}", headers=A)
    assert state(old.record.id) == "revoked"
    brief = issue_key(store, name="brief", scopes=["secret:read"], expires_in=10, now=time.time() - 60)
    assert state(brief.record.id) == "expired"
    # Revoked wins over expired, as verification answers key_revoked first.
    client.delete(f"/admin/keys/{brief.record.id}", headers=A)
    assert state(brief.record.id) == "revoked"
    problem(client.get("/secret", headers={"API-Key": brief.plaintext}), 401, "key_revoked")
    # The grace period ends by the clock: the state says so without any write.
    second = issue_key(store, name="second", scopes=["secret:read"])
    client.post(f"/admin/keys/{second.record.id}/rotate", headers=A, json={"grace": 60})
    stops = store.get(second.record.id).revoked_at
    monkeypatch.setattr(keys.model, "time", SimpleNamespace(time=lambda: stops + 1))
    assert state(second.record.id) == "revoked"

    # The limit in force: the app's configured default, or the key's own.
    other = make_app(store, DEFAULT_RATE_LIMIT="5 / second").test_client()
    shown = other.get(f"/admin/keys/{new['id']}", headers=A).get_json()
    assert shown["rate_limit"] == "5/second"
    own = issue_key(store, name="own", scopes=["secret:read"], rate_limit="7/hour")
    assert other.get(f"/admin/keys/{own.record.id}", headers=A).get_json()["rate_limit"] == "7/hour"


@MEMORY_ONLY
def test_an_allow_list_is_enforced(client, A):
    created = client.post("/admin/keys", headers=A, json={
        "name": "office", "scopes": ["secret:read"], "allowed_ips": ["10.0.0.0/8"]}).get_json()
    problem(client.get("/secret", headers={"API-Key": created["key"]}), 403, "ip_not_allowed")


BAD_CREATES = [
    ("invalid JSON", '{"name": "x"', "body"),
    ("array body", '[{"name": "x", "scopes": ["admin"]}]', "body"),
    ("JSON null", "null", "body"),
    ("missing name", '{"scopes": ["data:read"]}', "name"),
    ("missing scopes", '{"name": "x"}', "scopes"),
    ("name as a number", '{"name": 7, "scopes": ["data:read"]}', "name"),
    ("empty name", '{"name": "  ", "scopes": ["data:read"]}', "name"),
    ("name too long", '{"name": "' + "x" * 101 + '", "scopes": ["data:read"]}', "name"),
    ("name with a control character", '{"name": "a\\u0007b", "scopes": ["data:read"]}', "name"),
    ("scopes as a string", '{"name": "x", "scopes": "data:read"}', "scopes"),
    ("scopes of numbers", '{"name": "x", "scopes": [1]}', "scopes"),
    ("empty scopes", '{"name": "x", "scopes": []}', "scopes"),
    ("unknown scope", '{"name": "x", "scopes": ["root"]}', "scopes"),
    ("expires_in as words", '{"name": "x", "scopes": ["data:read"], "expires_in": "soon"}', "expires_in"),
    ("negative expires_in", '{"name": "x", "scopes": ["data:read"], "expires_in": -5}', "expires_in"),
    ("zero expires_in", '{"name": "x", "scopes": ["data:read"], "expires_in": 0}', "expires_in"),
    ("fractional expires_in", '{"name": "x", "scopes": ["data:read"], "expires_in": 1.5}', "expires_in"),
    ("boolean expires_in", '{"name": "x", "scopes": ["data:read"], "expires_in": true}', "expires_in"),
    ("huge expires_in", '{"name": "x", "scopes": ["data:read"], "expires_in": 99999999999999}', "expires_in"),
    ("rate_limit as words", '{"name": "x", "scopes": ["data:read"], "rate_limit": "fast"}', "rate_limit"),
    ("rate_limit as a number", '{"name": "x", "scopes": ["data:read"], "rate_limit": 100}', "rate_limit"),
    ("zero rate_limit", '{"name": "x", "scopes": ["data:read"], "rate_limit": "0/minute"}', "rate_limit"),
    ("allowed_ips as a string", '{"name": "x", "scopes": ["data:read"], "allowed_ips": "10.0.0.0/8"}',
     "allowed_ips"),
    ("allowed_ips not CIDR", '{"name": "x", "scopes": ["data:read"], "allowed_ips": ["intranet"]}',
     "allowed_ips"),
    ("allowed_ips with host bits", '{"name": "x", "scopes": ["data:read"], "allowed_ips": ["10.0.0.1/8"]}',
     "allowed_ips"),
    ("unknown field", '{"name": "x", "scopes": ["data:read"], "scope": "admin"}', "scope"),
    ("key supplied", '{"name": "x", "scopes": ["data:read"], "key": "kg_mine"}', "key"),
    # issue 12: the last duplicate used to win, creating an admin key
    ("duplicate scopes", '{"name": "x", "scopes": ["data:read"], "scopes": ["admin"]}', "scopes"),
    ("duplicate name", '{"name": "x", "name": "y", "scopes": ["data:read"]}', "name"),
    # issue 12: a zone id swallowed a second entry: stored as two, working from anywhere
    ("zone id and a space", '{"name": "x", "scopes": ["data:read"], "allowed_ips": ["::%x 0.0.0.0/0"]}',
     "allowed_ips"),
    ("zone id", '{"name": "x", "scopes": ["data:read"], "allowed_ips": ["fe80::1%eth0"]}', "allowed_ips"),
    ("zone id, bad second half", '{"name": "x", "scopes": ["data:read"], "allowed_ips": ["::%x 10.0.0.1/128"]}',
     "allowed_ips"),
    ("empty allowed_ips item", '{"name": "x", "scopes": ["data:read"], "allowed_ips": [""]}', "allowed_ips"),
    ("leading zero rate", '{"name": "x", "scopes": ["data:read"], "rate_limit": "010/minute"}', "rate_limit"),
    ("bidi override in the name", '{"name": "adm\\u202eni", "scopes": ["data:read"]}', "name"),
]


@MEMORY_ONLY
@pytest.mark.parametrize("body,field", [(b, f) for _, b, f in BAD_CREATES], ids=[w for w, _, _ in BAD_CREATES])
def test_bad_create_bodies_are_400_naming_the_field(client, store, A, body, field):
    count = store.count()
    resp = client.post("/admin/keys", headers=A, data=body, content_type="application/json")
    data = problem(resp, 400, "invalid_request")
    assert field in data["detail"], data
    assert store.count() == count  # nothing was created
    assert [e.event for e in store.events()] == ["create"]  # the admin key's only


# -- list ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [3, 4])  # 8 keys: a short last page, and an exact multiple
def test_list_pages_cover_every_key_exactly_once(client, store, admin, A, limit):
    ids = {admin.record.id} | {issue_key(store, name=f"k{i}", scopes=["data:read"]).record.id
                               for i in range(7)}
    seen: list[str] = []
    after = None
    for _ in range(10):
        resp = client.get("/admin/keys", headers=A,
                          query_string={"limit": limit, **({"after": after} if after else {})})
        assert resp.status_code == 200, resp.get_data(as_text=True)
        page = resp.get_json()
        assert len(page["keys"]) <= limit
        for meta in page["keys"]:
            assert_metadata(meta)
        seen += [m["id"] for m in page["keys"]]
        after = page["next"]
        if after is None:
            break
    assert after is None
    assert len(seen) == len(set(seen)) == len(ids) and set(seen) == ids
    assert seen == sorted(seen)  # a stable order, so a cursor can't skip or repeat

    everything = client.get("/admin/keys", headers=A).get_json()
    assert {m["id"] for m in everything["keys"]} == ids and everything["next"] is None
    assert_no_secrets(json.dumps(everything), store)


@MEMORY_ONLY
def test_list_cursor_may_name_a_missing_id(client, store, A):
    for i in range(3):
        issue_key(store, name=f"k{i}", scopes=["data:read"])
    all_ids = [m["id"] for m in client.get("/admin/keys", headers=A).get_json()["keys"]]
    # A cursor is a position, not a reference: a deleted/unknown id still pages on correctly.
    gap = all_ids[1][:-1] + ("0" if all_ids[1][-1] != "0" else "1")
    rest = client.get("/admin/keys", headers=A, query_string={"after": gap}).get_json()["keys"]
    assert [m["id"] for m in rest] == [i for i in all_ids if i > gap]


@MEMORY_ONLY
@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=-1", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
    ("limit=", "limit"), ("limit=1.5", "limit"), ("limit=%D9%A3", "limit"), ("after=short", "after"),
    ("after=" + "x" * 40, "after"), ("after=", "after"),
])
def test_bad_list_parameters_are_400_naming_them(client, A, query, field):
    data = problem(client.get(f"/admin/keys?{query}", headers=A), 400, "invalid_request")
    assert field in data["detail"]


@MEMORY_ONLY
def test_list_limits_at_the_edges(client, store, A):
    issue_key(store, name="k", scopes=["data:read"])
    one = client.get("/admin/keys", headers=A, query_string={"limit": 1}).get_json()
    assert len(one["keys"]) == 1 and one["next"] == one["keys"][0]["id"]
    assert len(client.get("/admin/keys", headers=A, query_string={"limit": 1000}).get_json()["keys"]) == 2


# -- show and revoke ------------------------------------------------------------------------------

def test_show_and_revoke(client, store, A):
    target = issue_key(store, name="victim", scopes=["secret:read"])
    K = {"API-Key": target.plaintext}
    assert client.get("/secret", headers=K).status_code == 200

    shown = client.get(f"/admin/keys/{target.record.id}", headers=A)
    assert shown.status_code == 200 and shown.get_json()["id"] == target.record.id
    assert_metadata(shown.get_json())

    first = client.delete(f"/admin/keys/{target.record.id}", headers=A)
    assert first.status_code == 204 and first.get_data() == b""
    problem(client.get("/secret", headers=K), 401, "key_revoked")
    revoked_at = client.get(f"/admin/keys/{target.record.id}", headers=A).get_json()["revoked_at"]
    assert revoked_at is not None and iso(revoked_at) <= time.time() + 1

    again = client.delete(f"/admin/keys/{target.record.id}", headers=A)
    assert again.status_code == 204  # harmless
    assert client.get(f"/admin/keys/{target.record.id}", headers=A).get_json()["revoked_at"] == revoked_at
    problem(client.get("/secret", headers=K), 401, "key_revoked")
    assert [e.event for e in store.events(key_id=target.record.id)] == ["revoke", "create"]


@MEMORY_ONLY
def test_unknown_ids_are_404(client, A):
    for key_id in (generate_key().key_id, "nope", "x" * 200, "kg_" + "A" * 50):
        problem(client.get(f"/admin/keys/{key_id}", headers=A), 404, "not_found")
        problem(client.delete(f"/admin/keys/{key_id}", headers=A), 404, "not_found")
        problem(client.post(f"/admin/keys/{key_id}/rotate", headers=A, json={}), 404, "not_found")


@MEMORY_ONLY
def test_wrong_methods_are_405_with_allow(client, A, admin):
    for method, path in [("PUT", "/admin/keys"), ("PUT", f"/admin/keys/{admin.record.id}"),
                         ("GET", f"/admin/keys/{admin.record.id}/rotate"), ("POST", "/admin/audit")]:
        resp = client.open(path, method=method, headers=A)
        problem(resp, 405, "method_not_allowed")
        assert resp.headers["Allow"]


# -- who may manage keys ---------------------------------------------------------------------------

def endpoints(key_id: str) -> list[tuple[str, str, dict | None]]:
    return [
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"name": "sneaky", "scopes": ["admin"]}),
        ("GET", f"/admin/keys/{key_id}", None),
        ("DELETE", f"/admin/keys/{key_id}", None),
        ("POST", f"/admin/keys/{key_id}/rotate", {}),
        ("GET", "/admin/audit", None),
    ]


def test_only_admin_keys_may_manage_keys(client, store, admin):
    target = issue_key(store, name="target", scopes=["secret:read", "data:read"])
    stranger = issue_key(store, name="stranger", scopes=["secret:read", "data:read"])
    revoked_admin = issue_key(store, name="ex-admin", scopes=["admin"])
    store.revoke(revoked_admin.record.id, time.time())
    events = len(store.events())
    for method, path, body in endpoints(target.record.id):
        kw = {} if body is None else {"json": body}
        missing = problem(client.open(path, method=method, **kw), 401, "missing_credentials")
        assert missing["detail"]
        assert client.open(path, method=method, **kw).headers["WWW-Authenticate"] == 'ApiKey realm="keygate"'
        wrong = client.open(path, method=method, headers={"API-Key": generate_key().plaintext}, **kw)
        problem(wrong, 401, "invalid_credentials")
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
        problem(client.open(path, method=method, headers={"API-Key": revoked_admin.plaintext}, **kw),
                401, "key_revoked")
        # The caller's own key is fine, it just isn't an admin key.
        for who in (stranger, target):
            denied = problem(client.open(path, method=method, headers={"API-Key": who.plaintext}, **kw),
                             403, "insufficient_scope")
            assert "admin" in denied["detail"]
    # Nothing changed: no key created, revoked or rotated; nothing audited.
    assert store.count() == 4
    assert store.get(target.record.id).revoked_at is None
    assert len(store.events()) == events
    assert client.get("/secret", headers={"API-Key": target.plaintext}).status_code == 200


# -- rotate ------------------------------------------------------------------------------------------

SETTINGS = dict(scopes=["secret:read", "data:read"], rate_limit="100/minute",
                allowed_ips=["127.0.0.0/8", "10.0.0.0/8"], expires_in=30 * 86400)


def assert_same_settings(new: dict, old: dict) -> None:
    for field in ("name", "scopes", "rate_limit", "allowed_ips", "expires_at"):
        assert new[field] == old[field], field
    assert new["id"] != old["id"]
    assert new["replaces"] == old["id"]
    assert new["revoked_at"] is None


def test_rotate_without_grace_stops_the_old_key_now(client, store, A):
    old = issue_key(store, name="service", **SETTINGS)
    old_meta = client.get(f"/admin/keys/{old.record.id}", headers=A).get_json()
    resp = client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    new = resp.get_json()
    assert_metadata(new, with_key=True)
    assert_same_settings(new, old_meta)
    assert resp.headers["Location"].endswith(f"/admin/keys/{new['id']}")

    problem(client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")
    assert client.get("/secret", headers={"API-Key": new["key"]}).status_code == 200
    assert client.get(f"/admin/keys/{old.record.id}", headers=A).get_json()["revoked_at"] is not None
    shown = client.get(f"/admin/keys/{new['id']}", headers=A)
    assert_metadata(shown.get_json())
    assert shown.get_json()["replaces"] == old.record.id
    assert new["key"] not in shown.get_data(as_text=True)
    assert_no_secrets(shown.get_data(as_text=True) + resp.get_data(as_text=True), store)

    # A rotated key can't be rotated again: rotate its replacement.
    again = problem(client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={}), 409, "conflict")
    assert old.record.id in again["detail"]
    assert store.count() == 3


def test_rotate_with_grace_keeps_the_old_key_until_it_ends(client, store, A, monkeypatch):
    old = issue_key(store, name="service", **SETTINGS)
    before = time.time()
    resp = client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={"grace": "1h"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    new = resp.get_json()
    assert new["replaces"] == old.record.id

    assert client.get("/secret", headers={"API-Key": old.plaintext}).status_code == 200
    assert client.get("/secret", headers={"API-Key": new["key"]}).status_code == 200
    shown = iso(client.get(f"/admin/keys/{old.record.id}", headers=A).get_json()["revoked_at"])
    assert before + 3599 <= shown <= time.time() + 3601
    stops = store.get(old.record.id).revoked_at  # exact; the metadata shows whole seconds
    # The store agrees: valid just before the end of the grace period, revoked from then on.
    assert verify_key(store, old.plaintext, now=stops - 1).id == old.record.id
    with pytest.raises(KeyRevoked):
        verify_key(store, old.plaintext, now=stops)

    # In a grace period the key is on its way out: no second rotation.
    problem(client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={}), 409, "conflict")

    # An hour later (by the verifier's clock) the old key is refused over HTTP too.
    monkeypatch.setattr(keys.verify, "time", SimpleNamespace(time=lambda: stops + 1))
    problem(client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")
    assert client.get("/secret", headers={"API-Key": new["key"]}).status_code == 200


@MEMORY_ONLY
def test_a_grace_period_really_ends(client, store, A, monkeypatch):
    old = issue_key(store, name="service", scopes=["secret:read"])
    resp = client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={"grace": 1})
    assert resp.status_code == 201
    assert client.get("/secret", headers={"API-Key": old.plaintext}).status_code == 200
    # A second later, by the verifier's clock (it reads time.time(); no need to wait for it).
    later = time.time() + 1.1
    monkeypatch.setattr(keys.verify, "time", SimpleNamespace(time=lambda: later))
    problem(client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")
    assert client.get("/secret", headers={"API-Key": resp.get_json()["key"]}).status_code == 200


@MEMORY_ONLY
def test_revoking_during_grace_stops_the_old_key_at_once(client, store, A):
    old = issue_key(store, name="service", scopes=["secret:read"])
    assert client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, json={"grace": "1h"}).status_code == 201
    assert client.delete(f"/admin/keys/{old.record.id}", headers=A).status_code == 204
    problem(client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")


@MEMORY_ONLY
def test_rotating_a_revoked_rotated_or_expired_key_is_a_409_conflict(client, store, A):
    """A well-formed request the key's state refuses (issue 12: it was a 400)."""
    revoked = issue_key(store, name="r", scopes=["data:read"])
    client.delete(f"/admin/keys/{revoked.record.id}", headers=A)
    assert "already revoked" in problem(
        client.post(f"/admin/keys/{revoked.record.id}/rotate", headers=A, json={}), 409, "conflict")["detail"]
    expired = issue_key(store, name="e", scopes=["data:read"], expires_in=60, now=time.time() - 120)
    problem(client.post(f"/admin/keys/{expired.record.id}/rotate", headers=A, json={}), 409, "conflict")
    rotated = issue_key(store, name="o", scopes=["data:read"])
    assert client.post(f"/admin/keys/{rotated.record.id}/rotate", headers=A, json={"grace": "1h"}).status_code == 201
    problem(client.post(f"/admin/keys/{rotated.record.id}/rotate", headers=A, json={}), 409, "conflict")
    assert store.count() == 5  # no replacement was made but the one that was allowed


@MEMORY_ONLY
@pytest.mark.parametrize("body,field", [
    ('{"grace": "soon"}', "grace"), ('{"grace": -1}', "grace"), ('{"grace": 0}', "grace"),
    ('{"grace": "0s"}', "grace"), ('{"grace": 1.5}', "grace"), ('{"grace": true}', "grace"),
    ('{"grace": ["1h"]}', "grace"), ('{"grace": "1h", "name": "new"}', "name"), ('[]', "body"),
    ('{"grace": ', "body"),
], ids=["words", "negative", "zero", "zero-text", "fraction", "boolean", "list", "unknown-field",
        "array", "invalid-json"])
def test_bad_rotate_bodies_are_400_naming_the_field(client, store, A, body, field):
    old = issue_key(store, name="service", scopes=["secret:read"])
    resp = client.post(f"/admin/keys/{old.record.id}/rotate", headers=A, data=body, content_type="application/json")
    assert field in problem(resp, 400, "invalid_request")["detail"]
    assert client.get("/secret", headers={"API-Key": old.plaintext}).status_code == 200  # untouched
    assert store.count() == 2


# -- rotation over the CLI --------------------------------------------------------------------------

def assert_clean_failure(proc, *, names: str) -> None:  # noqa: ANN001
    assert_one_line_failure(proc, names=names)
    assert "kg_" not in proc.stdout  # no key was printed


@pytest.fixture
def cli_client(cli_store, tmp_path):  # noqa: ANN001, ANN201
    app = create_app({"DATABASE_URL": "memory://", "INSTANCE_PATH": str(tmp_path / "app")}, store=cli_store)
    yield app.test_client()
    app.extensions["keygate.usage"].close()


def test_rotate_key_cli_without_grace(env, cli_store, cli_client):
    old = issue_key(cli_store, name="service", **SETTINGS)
    old_meta = old.record.metadata()
    proc = invoke_cli(env, "rotate-key", old.record.id, "--json")
    assert proc.returncode == 0, proc.stderr
    new = json.loads(proc.stdout)
    assert_metadata(new, with_key=True)
    assert_same_settings(new, old_meta)
    assert new["key"] not in proc.stderr

    problem(cli_client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")
    assert cli_client.get("/secret", headers={"API-Key": new["key"]}).status_code == 200

    assert_clean_failure(invoke_cli(env, "rotate-key", old.record.id), names=old.record.id)  # already rotated
    assert_clean_failure(invoke_cli(env, "rotate-key", generate_key().key_id), names="no key")
    assert cli_store.count() == 2


def test_rotate_key_cli_with_grace(env, cli_store, cli_client, monkeypatch):
    old = issue_key(cli_store, name="service", **SETTINGS)
    assert_clean_failure(invoke_cli(env, "rotate-key", old.record.id, "--grace", "a while"), names="grace")
    assert_clean_failure(invoke_cli(env, "rotate-key", old.record.id, "--grace", "0s"), names="grace")
    assert cli_store.count() == 1

    proc = invoke_cli(env, "rotate-key", old.record.id, "--grace", "1h")
    assert proc.returncode == 0, proc.stderr
    new_key = proc.stdout.strip()  # without --json: the key alone on stdout, the story on stderr
    assert "\n" not in new_key and new_key.startswith("kg_")
    assert "1h" in proc.stderr and new_key not in proc.stderr

    assert cli_client.get("/secret", headers={"API-Key": old.plaintext}).status_code == 200
    assert cli_client.get("/secret", headers={"API-Key": new_key}).status_code == 200
    new_id = verify_key(cli_store, new_key).id
    new_meta = cli_client.get(f"/admin/keys/{new_id}", headers={"API-Key": issue_key(
        cli_store, name="admin", scopes=["admin"]).plaintext}).get_json()
    assert_same_settings(new_meta, old.record.metadata())

    stops = cli_store.get(old.record.id).revoked_at
    assert time.time() + 3500 < stops < time.time() + 3601
    monkeypatch.setattr(keys.verify, "time", SimpleNamespace(time=lambda: stops + 1))
    problem(cli_client.get("/secret", headers={"API-Key": old.plaintext}), 401, "key_revoked")
    assert cli_client.get("/secret", headers={"API-Key": new_key}).status_code == 200


# -- issue 12: bodies, allow-lists as stored --------------------------------------------------


@MEMORY_ONLY
@pytest.mark.parametrize("path", ["/admin/keys", "/tokens", "/admin/keys/{id}/rotate"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_64_kib_is_413(client, store, A, path, chunked):
    target = issue_key(store, name="t", scopes=["data:read"])
    body = b'{"name": "' + b"x" * (64 * 1024) + b'"}'
    if chunked:  # no Content-Length: the body is read up to the limit, no further
        resp = client.post(path.format(id=target.record.id), headers={**A, "Transfer-Encoding": "chunked"},
                           input_stream=io.BytesIO(body), content_type="application/json",
                           environ_overrides={"wsgi.input_terminated": True})
    else:
        resp = client.post(path.format(id=target.record.id), headers=A, data=body, content_type="application/json")
    assert problem(resp, 413, "payload_too_large")["detail"] == "body must be at most 65536 bytes"
    assert store.count() == 2


@MEMORY_ONLY
def test_a_duplicate_field_in_a_token_request_is_refused(client, A):
    resp = client.post("/tokens", headers=A, data='{"ttl": 86400000, "ttl": 60}', content_type="application/json")
    assert "ttl" in problem(resp, 400, "invalid_request")["detail"]


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("stored", ["::%x 10.0.0.1/128", "::%x 0.0.0.0/0", '["10.0.0.1/8"]', "[nope"])
def test_a_bad_stored_allow_list_entry_is_403_never_500(client, store, A, stored):
    """Entries written by an older keygate (space-separated, split apart) or by hand."""
    import sqlalchemy as sa

    from keys.store.schema import keys_table

    fenced = issue_key(store, name="f", scopes=["secret:read"], allowed_ips=["192.0.2.0/24"])
    with store.engine.begin() as conn:
        conn.execute(keys_table.update().where(keys_table.c.id == fenced.record.id).values(allowed_ips=stored))
    client.application.extensions["keygate"].lookup.clear()
    problem(client.get("/secret", headers={"API-Key": fenced.plaintext}), 403, "ip_not_allowed")
    assert client.get(f"/admin/keys/{fenced.record.id}", headers=A).status_code == 200
