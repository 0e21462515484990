"""The audit trail: every lifecycle event with its time, actor and key (never a
secret), read through ``GET /admin/audit`` and ``manage.py audit``; and
authentication failures, counted per outcome code behind the request path.
"""

from __future__ import annotations

import getpass
import json
import re
import time

import pytest

from api import create_app
from conftest import invoke_cli, iso, run_cli
from keys import generate_key, issue_key, open_store

PROBLEM = "application/problem+json"
MEMORY_ONLY = pytest.mark.parametrize("store_url", ["memory://"], ids=["memory"])
EVENT_FIELDS = {"id", "at", "event", "key_id", "actor", "detail"}


def problem(resp, status: int, code: str) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == PROBLEM
    data = resp.get_json()
    assert data["code"] == code, data
    return data


def assert_free_of(text: str, secrets: list[str]) -> None:
    for value in secrets:
        assert value not in text
        assert value[-24:] not in text  # not even the tail of one


def cli_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


def audit(client, A, **query) -> dict:  # noqa: ANN001, N803
    resp = client.get("/admin/audit", headers=A, query_string=query)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()


# -- lifecycle events through the API --------------------------------------------------------------

def test_api_lifecycle_events_are_recorded_without_secrets(client, store, store_url, admin, A):
    t0 = time.time()
    created = client.post("/admin/keys", headers=A, json={"name": "svc", "scopes": ["data:read"]}).get_json()
    token = client.post("/tokens", headers={"API-Key": created["key"]}, json={"ttl": 60}).get_json()
    assert client.get("/data", query_string={"token": token["token"]}).status_code == 200
    rotated = client.post(f"/admin/keys/{created['id']}/rotate", headers=A, json={"grace": "1h"}).get_json()
    assert client.delete(f"/admin/keys/{rotated['id']}", headers=A).status_code == 204
    assert client.delete(f"/admin/keys/{rotated['id']}", headers=A).status_code == 204  # no second event
    t1 = time.time()

    body = audit(client, A)
    events = body["events"]
    assert [(e["event"], e["key_id"]) for e in events] == [
        ("revoke", rotated["id"]),
        ("create", rotated["id"]),  # the replacement's history starts with the rotation
        ("rotate", created["id"]),
        ("mint_token", created["id"]),
        ("create", created["id"]),
        ("create", admin.record.id),  # issued by the test, outside the API
    ]
    for e in events:
        assert set(e) >= EVENT_FIELDS
        assert iso(e["at"]) <= t1 + 1 and e["at"].endswith("Z")
    # The API's five within the test's window; the admin key's own was made by a fixture,
    # before t0 (by more than a second on a loaded machine: CI failed on exactly that).
    assert all(t0 - 1 <= iso(e["at"]) for e in events[:5])
    ids = [e["id"] for e in events]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)  # newest first
    by_admin = f"key:{admin.record.id}"
    assert [e["actor"] for e in events[:5]] == [by_admin, by_admin, by_admin, f"key:{created['id']}", by_admin]
    revoke, replacement, rotate, minted, create = events[:5]
    assert rotate["detail"]["new_key_id"] == rotated["id"] and rotate["detail"]["grace_seconds"] == 3600
    assert replacement["detail"] == {"name": "svc", "scopes": ["data:read"], "replaces": created["id"]}
    assert minted["detail"]["scopes"] == ["data:read"] and minted["detail"]["expires_at"] == token["expires_at"]
    assert create["detail"]["name"] == "svc" and create["detail"]["scopes"] == ["data:read"]

    # Never a secret: no key, no token, no hash, anywhere in the trail.
    text = json.dumps(body)
    hashes = [store.get(i).key_hash for i in (admin.record.id, created["id"], rotated["id"])]
    assert_free_of(text, [admin.plaintext, created["key"], rotated["key"], token["token"], *hashes])
    assert_free_of(text, [token["token"].split(".")[-1]])  # nor the token's signature

    # The filter: one key's history.
    mine = audit(client, A, key_id=created["id"])["events"]
    assert [e["event"] for e in mine] == ["rotate", "mint_token", "create"]
    assert audit(client, A, key_id=generate_key().key_id)["events"] == []

    # Durable: a fresh connection to the same store reads the same trail.
    if store.backend != "memory":
        reopened = open_store(store_url)
        try:
            assert [e.as_dict() for e in reopened.events()] == events
        finally:
            reopened.close()


@MEMORY_ONLY
def test_refused_changes_leave_no_event(client, store, A):
    victim = issue_key(store, name="victim", scopes=["data:read"])
    stranger = issue_key(store, name="stranger", scopes=["data:read", "secret:read"])
    before = [e.id for e in store.events()]
    S = {"API-Key": stranger.plaintext}
    problem(client.delete(f"/admin/keys/{victim.record.id}", headers=S), 403, "insufficient_scope")
    problem(client.post(f"/admin/keys/{victim.record.id}/rotate", headers=S, json={}), 403, "insufficient_scope")
    problem(client.post("/admin/keys", headers=S, json={"name": "x", "scopes": ["admin"]}), 403, "insufficient_scope")
    problem(client.post("/admin/keys", headers=A, json={"name": "x", "scopes": ["root"]}), 400, "invalid_request")
    problem(client.post(f"/admin/keys/{victim.record.id}/rotate", headers=A, json={"grace": -1}),
            400, "invalid_request")
    problem(client.post(f"/admin/keys/{generate_key().key_id}/rotate", headers=A, json={}), 404, "not_found")
    problem(client.delete(f"/admin/keys/{generate_key().key_id}", headers=A), 404, "not_found")
    problem(client.post("/tokens", headers={"API-Key": victim.plaintext}, json={"scopes": ["admin"]}),
            403, "insufficient_scope")
    problem(client.post("/tokens", headers={"API-Key": victim.plaintext}, json={"ttl": 0}),
            400, "invalid_request")
    assert [e.id for e in store.events()] == before


def test_audit_pages_cover_every_event_once(client, store, A):
    keys = [issue_key(store, name=f"k{i}", scopes=["data:read"]) for i in range(4)]
    for k in keys[:2]:
        assert client.delete(f"/admin/keys/{k.record.id}", headers=A).status_code == 204
    everything = audit(client, A, limit=1000)
    assert len(everything["events"]) == 7 and everything["next"] is None
    for limit in (1, 3, 7):
        seen, before = [], None
        for _ in range(10):
            page = audit(client, A, limit=limit, **({"before": before} if before else {}))
            assert len(page["events"]) <= limit
            seen += page["events"]
            before = page["next"]
            if before is None:
                break
        assert seen == everything["events"]  # same events, same order, none twice
    # Filter and page at once.
    k0 = keys[0].record.id
    first = audit(client, A, key_id=k0, limit=1)
    assert [e["event"] for e in first["events"]] == ["revoke"]
    second = audit(client, A, key_id=k0, limit=1, before=first["next"])
    assert [e["event"] for e in second["events"]] == ["create"]
    assert all(e["key_id"] == k0 for e in first["events"] + second["events"])


@MEMORY_ONLY
@pytest.mark.parametrize("query,field", [
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=many", "limit"), ("limit=-5", "limit"),
    ("before=0", "before"), ("before=-1", "before"), ("before=latest", "before"),
    ("key_id=short", "key_id"), ("key_id=", "key_id"),
])
def test_bad_audit_parameters_are_400_naming_them(client, A, query, field):
    data = problem(client.get(f"/admin/audit?{query}", headers=A), 400, "invalid_request")
    assert field in data["detail"]


# -- authentication failures, counted behind the request path ------------------------------------

class CountingStore:
    """Wraps the store's write of failure counts so the test sees every call."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self.calls = 0
        self._write = store.add_auth_failures

    def __call__(self, counts) -> None:  # noqa: ANN001
        self.calls += 1
        self._write(counts)


def test_auth_failures_are_counted_without_a_write_per_request(app, client, store, A, monkeypatch):
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600  # no background flush during the test; flush() below is the only one
    writes = CountingStore(store)
    monkeypatch.setattr(store, "add_auth_failures", writes)
    reader = issue_key(store, name="reader", scopes=["data:read"])
    baseline = store.auth_failures()

    expected = {"missing_credentials": 20, "invalid_credentials": 15, "invalid_token": 10,
                "insufficient_scope": 5}
    for _ in range(20):
        assert client.get("/secret").status_code == 401
    for _ in range(15):
        assert client.get("/secret", headers={"API-Key": generate_key().plaintext}).status_code == 401
    for i in range(10):
        assert client.get("/data", query_string={"token": f"forged-{i}"}).status_code == 401
    for _ in range(5):
        assert client.get("/admin", headers={"API-Key": reader.plaintext}).status_code == 403

    # 50 refusals, not one store write for them...
    assert writes.calls == 0
    assert store.auth_failures() == baseline
    # ... yet the read-out already counts them (this process's pending counts are merged in).
    assert audit(client, A)["auth_failures"] == expected

    usage.flush()
    assert writes.calls == 1
    assert store.auth_failures() == expected
    assert audit(client, A)["auth_failures"] == expected  # not counted twice

    # Successful requests count nothing.
    assert client.get("/data", headers={"API-Key": reader.plaintext}).status_code == 200
    usage.flush()
    assert store.auth_failures() == expected


@MEMORY_ONLY
def test_failure_counts_add_up_across_flushes(app, client, store, A):
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600
    for _ in range(3):
        client.get("/secret")
    usage.flush()
    for _ in range(2):
        client.get("/secret")
    assert audit(client, A)["auth_failures"] == {"missing_credentials": 5}
    usage.flush()
    assert store.auth_failures() == {"missing_credentials": 5}


# -- the CLI: its actions are audited as cli:<user>, and `audit` reads the trail ----------------------

def cli_json(env, *args: str):  # noqa: ANN001, ANN201
    proc = invoke_cli(env, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cli_lifecycle_events_and_the_audit_command(env, tmp_path):
    outputs: list[str] = []  # everything the CLI printed
    admin = cli_json(env, "init")["admin_key"]
    svc = cli_json(env, "create-key", "--name", "svc", "--scope", "data:read", "--scope", "secret:read")
    token = cli_json(env, "mint-token", svc["id"], "--scope", "data:read", "--ttl", "5m")
    rotated = cli_json(env, "rotate-key", svc["id"], "--grace", "1h")
    revoke = invoke_cli(env, "revoke-key", "--key", "-", input=rotated["key"] + "\n")  # by (leaked) value
    assert revoke.returncode == 0, revoke.stderr
    secrets = [admin["key"], svc["key"], rotated["key"], token["token"]]

    # Failures made by a server process are flushed to the same store, and `audit` shows them.
    store = open_store(env["KEYGATE_DATABASE_URL"])
    try:
        app = create_app({"DATABASE_URL": env["KEYGATE_DATABASE_URL"], "INSTANCE_PATH": str(tmp_path / "app")},
                         store=store)
        client = app.test_client()
        for _ in range(3):
            client.get("/data", query_string={"token": svc["key"]})  # a raw key in a URL
        client.get("/secret")
        api_view = audit(client, {"API-Key": admin["key"]}, limit=1000)
        app.extensions["keygate.usage"].close()  # clean shutdown: the counts reach the store
        hashes = [store.get(i).key_hash for i in (admin["id"], svc["id"], rotated["id"])]
    finally:
        store.close()

    proc = invoke_cli(env, "audit", "--json")
    assert proc.returncode == 0, proc.stderr
    outputs += [proc.stdout, proc.stderr]
    trail = json.loads(proc.stdout)
    events = trail["events"]
    assert [(e["event"], e["key_id"]) for e in events] == [
        ("revoke", rotated["id"]),
        ("create", rotated["id"]),
        ("rotate", svc["id"]),
        ("mint_token", svc["id"]),
        ("create", svc["id"]),
        ("create", admin["id"]),
    ]
    assert {e["actor"] for e in events} == {f"cli:{cli_user()}"}
    for e in events:
        assert set(e) >= EVENT_FIELDS
        assert abs(iso(e["at"]) - time.time()) < 600
    assert events == api_view["events"]  # one trail, whichever way it is read
    assert trail["auth_failures"] == {"invalid_token": 3, "missing_credentials": 1}

    only_svc = cli_json(env, "audit", "--key", svc["id"])
    assert [e["event"] for e in only_svc["events"]] == ["rotate", "mint_token", "create"]
    newest = cli_json(env, "audit", "--limit", "2")
    assert [e["event"] for e in newest["events"]] == ["revoke", "create"]
    assert [e["event"] for e in cli_json(env, "audit", "--key", rotated["id"])["events"]] == ["revoke", "create"]
    outputs += [json.dumps(only_svc), json.dumps(newest)]

    # The text is a table: a header, a row per event (detail as name=value, lists comma-joined,
    # no Python syntax), then the failure counts per code.
    text = invoke_cli(env, "audit")
    assert text.returncode == 0, text.stderr
    outputs += [text.stdout, text.stderr]
    lines = text.stdout.strip().splitlines()
    assert lines[0].split() == ["AT", "(UTC)", "EVENT", "KEY", "ACTOR", "DETAIL"]
    for e, line in zip(events, lines[1:]):
        assert e["event"] in line and e["key_id"] in line and e["actor"] in line
    assert "scopes=data:read,secret:read" in text.stdout or "scopes=secret:read,data:read" in text.stdout
    assert not re.search(r"[\[\]{}']", text.stdout), text.stdout
    failures = lines[lines.index(next(x for x in lines if x.startswith("AUTH FAILURES"))) + 1:]
    assert [f.split() for f in failures] == [["invalid_token", "3"], ["missing_credentials", "1"]]
    # One key's trail: its events only; the failure counts (per code, not per key) are left out.
    one = invoke_cli(env, "audit", "--key", svc["id"])
    assert "AUTH FAILURES" not in one.stdout and len(one.stdout.strip().splitlines()) == 1 + 3

    for bad in (["--limit", "0"], ["--limit", "lots"]):
        proc = invoke_cli(env, "audit", *bad)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and "limit" in proc.stderr
    # An unknown key is an error, not an empty trail.
    for unknown in ("nosuchkeyid1", svc["key"]):
        proc = invoke_cli(env, "audit", "--key", unknown)
        assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "nosuchkeyid1" in proc.stderr or "not a key id" in proc.stderr
        outputs.append(proc.stderr)

    assert_free_of("\n".join(outputs), secrets + hashes)


# -- issue 12: token mints summarised, retention, actors that can't forge lines ----------------


def test_token_mints_are_one_summary_event_per_key_and_hour(client, store, admin, A):
    reader = issue_key(store, name="reader", scopes=["secret:read", "data:read"])
    R = {"API-Key": reader.plaintext}  # noqa: N806
    before = len(audit(client, A, limit=1000)["events"])
    for i in range(30):
        body = {"scopes": ["data:read"], "ttl": 60} if i % 2 else {"scopes": ["secret:read"], "ttl": 600}
        assert client.post("/tokens", headers=R, json=body).status_code == 201
    assert client.post("/tokens", headers=A).status_code == 201
    events = audit(client, A, limit=1000)["events"]
    assert len(events) == before + 2  # not 31 more
    (mints,) = [e for e in events if e["event"] == "mint_token" and e["key_id"] == reader.record.id]
    assert mints["actor"] == f"key:{reader.record.id}"
    assert mints["detail"]["count"] == 30
    assert sorted(mints["detail"]["scopes"]) == ["data:read", "secret:read"]
    assert iso(mints["detail"]["last_at"]) >= iso(mints["at"])
    assert abs(iso(mints["detail"]["expires_at"]) - (time.time() + 600)) < 60  # the latest expiry
    assert_free_of(json.dumps(events), [reader.plaintext])


def test_a_new_hour_starts_a_new_summary(store, make_app, monkeypatch):
    import keys.tokens

    app = make_app(store)
    client = app.test_client()
    reader = issue_key(store, name="reader", scopes=["data:read"])
    start = 1_900_000_800.0  # an hour's first second (a multiple of 3600)
    for offset in (0, 1, 3599, 3600, 3601):
        monkeypatch.setattr(keys.tokens.time, "time", lambda o=offset: start + o)
        assert client.post("/tokens", headers={"API-Key": reader.plaintext}).status_code == 201
    counts = [e.detail["count"] for e in store.events(key_id=reader.record.id) if e.event == "mint_token"]
    assert counts == [2, 3]  # newest first


def test_audit_retention_runs_in_the_background_without_blocking_requests(tmp_path, monkeypatch):
    import threading

    from keys.model import AuditEvent
    from keys.retention import AuditRetention
    from keys.store import MemoryKeyStore

    store = MemoryKeyStore()
    admin = issue_key(store, name="admin", scopes=["admin"])
    now = time.time()
    for age_days in (400, 120, 91, 89, 1):
        store.record_event(AuditEvent("create", "AAAAAAAAAAAA", "cli:t", now - age_days * 86400))
    app = create_app({"DATABASE_URL": "memory://", "INSTANCE_PATH": str(tmp_path), "AUDIT_RETENTION": "90d"},
                     store=store)
    assert app.extensions["keygate.retention"].keep_seconds == 90 * 86400
    app.extensions["keygate.close"]()

    release, pruning = threading.Event(), threading.Event()
    prune = store.prune_events

    def slow_prune(before: float, batch: int = 1000) -> int:
        pruning.set()
        release.wait(10)
        return prune(before, batch)

    monkeypatch.setattr(store, "prune_events", slow_prune)
    retention = AuditRetention(store, 90 * 86400, first_after=0.01)
    retention.start()
    assert pruning.wait(5), "the retention thread never ran"
    client = create_app({"DATABASE_URL": "memory://", "INSTANCE_PATH": str(tmp_path / "b")},
                        store=store).test_client()
    started = time.monotonic()
    assert client.get("/admin", headers={"API-Key": admin.plaintext}).status_code == 200  # while it prunes
    assert time.monotonic() - started < 2
    release.set()
    deadline = time.monotonic() + 5
    while len(store.events(key_id="AAAAAAAAAAAA")) != 2:
        assert time.monotonic() < deadline, "old events were not pruned"
        time.sleep(0.05)
    assert sorted(round((now - e.at) / 86400) for e in store.events(key_id="AAAAAAAAAAAA")) == [1, 89]
    retention.close()


@pytest.mark.parametrize("value", ["forever", "0d", "-1d", "90", "23h"])
def test_a_bad_audit_retention_names_the_variable(value):
    """"90" is 90 seconds (plain seconds are a duration): refused, or it would delete the trail
    of someone who meant days."""
    from keys.exc import ConfigError

    with pytest.raises(ConfigError) as info:
        create_app({"DATABASE_URL": "memory://", "AUDIT_RETENTION": value})
    assert "KEYGATE_AUDIT_RETENTION" in str(info.value)


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_a_hostile_os_user_name_cannot_forge_an_audit_line(env):
    """LOGNAME with a newline and an escape sequence: stored escaped, one line per event."""
    hostile = {**env, "LOGNAME": "evil\nline2 2026-01-01T00:00:00Z  revoke  AAAAAAAAAAAA  cli:root\x1b[2J",
               "USER": "x", "LNAME": "x", "USERNAME": "x"}
    admin = json.loads(run_cli(hostile, "init", "--json").stdout)["admin_key"]
    assert run_cli(hostile, "create-key", "--name", "n", "--scope", "data:read").returncode == 0
    text = run_cli(env, "audit")
    assert text.returncode == 0
    assert "\x1b" not in text.stdout
    rows = [line for line in text.stdout.splitlines() if "cli:" in line]  # the table's event rows
    assert len(rows) == 2 and all("cli:evil\\nline2" in row for row in rows), text.stdout
    assert not any(line.startswith("2026-01-01") for line in text.stdout.splitlines())  # no forged row
    trail = json.loads(run_cli(env, "audit", "--json").stdout)
    for event in trail["events"]:
        assert event["actor"].isprintable() and event["actor"].startswith("cli:evil\\nline2")
    assert admin["id"] in {e["key_id"] for e in trail["events"]}
