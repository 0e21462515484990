"""Editing keys (PATCH /admin/keys/<id>, `update-key`) and usage over time (hourly counts,
GET /admin/keys/<id>/usage, `usage`), on every store backend; across processes in
test_multi_instance.py and test_console_http.py."""

from __future__ import annotations

import json
import time

import pytest

from conftest import assert_one_line_failure, run_cli
from keys import issue_key
from keys.usage import HOUR, UsageRecorder


def test_patch_edits_in_place_and_takes_effect_at_once(client, A, store):
    key = issue_key(store, name="svc", scopes=["secret:read", "data:read"])
    h = {"API-Key": key.plaintext}
    token = client.post("/tokens", headers=h, json={"scopes": ["secret:read", "data:read"]}).get_json()["token"]
    assert client.get("/secret", headers=h).status_code == 200
    resp = client.patch(f"/admin/keys/{key.record.id}", headers=A, json={
        "name": "svc2", "scopes": ["data:read"], "rate_limit": "50/minute", "allowed_ips": ["127.0.0.0/8"],
        "expires_in": "30d"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["id"] == key.record.id and body["name"] == "svc2" and body["scopes"] == ["data:read"]
    assert body["rate_limit"] == "50/minute" and body["allowed_ips"] == ["127.0.0.0/8"]
    assert body["expires_at"] is not None and "key" not in body
    # Same key, narrower: refused where it no longer may go, still fine where it may.
    assert client.get("/secret", headers=h).get_json()["code"] == "insufficient_scope"
    assert client.get("/data", headers=h).status_code == 200
    # Its tokens held secret:read: narrowing killed them.
    assert client.get("/data", query_string={"token": token}).get_json()["code"] == "invalid_token"
    [event] = store.events(key_id=key.record.id, event="update")
    assert event.actor.startswith("key:")
    assert set(event.detail["changed"]) == {"name", "scopes", "rate_limit", "allowed_ips", "expires_at"}
    assert key.plaintext not in json.dumps(event.detail)
    # null clears what can be cleared
    cleared = client.patch(f"/admin/keys/{key.record.id}", headers=A,
                           json={"expires_in": None, "rate_limit": None, "allowed_ips": None}).get_json()
    assert cleared["expires_at"] is None and cleared["allowed_ips"] == []
    assert cleared["rate_limit"] == "600/minute" and store.get(key.record.id).rate_limit is None  # the default


@pytest.mark.parametrize("body, field", [
    ({"scope": ["data:read"]}, "scope"), ({"name": ""}, "name"), ({"name": None}, "name"),
    ({"scopes": []}, "scopes"), ({"scopes": "data:read"}, "scopes"), ({"scopes": ["nope"]}, "scopes"),
    ({"rate_limit": "fast"}, "rate_limit"), ({"allowed_ips": ["10.0.0.1/8"]}, "allowed_ips"),
    ({"expires_in": -5}, "expires_in"), ({"expires_in": "soon"}, "expires_in"), ({"key": "kg_x"}, "key"),
])
def test_patch_refuses_what_create_refuses_and_changes_nothing(client, A, store, body, field):
    key = issue_key(store, name="svc", scopes=["data:read"]).record
    resp = client.patch(f"/admin/keys/{key.id}", headers=A, json=body)
    assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_request", resp.get_data(as_text=True)
    assert field in resp.get_json()["detail"]
    assert store.get(key.id) == key


def test_patch_a_revoked_or_rotated_key_is_409_and_needs_admin(client, A, store):
    revoked = issue_key(store, name="r", scopes=["data:read"])
    assert client.delete(f"/admin/keys/{revoked.record.id}", headers=A).status_code == 204
    resp = client.patch(f"/admin/keys/{revoked.record.id}", headers=A, json={"name": "back"})
    assert resp.status_code == 409 and resp.get_json()["code"] == "conflict"
    rotating = issue_key(store, name="g", scopes=["data:read"])
    assert client.post(f"/admin/keys/{rotating.record.id}/rotate", headers=A, json={"grace": "1h"}).status_code == 201
    resp = client.patch(f"/admin/keys/{rotating.record.id}", headers=A, json={"name": "x"})
    assert resp.status_code == 409 and "replacement" in resp.get_json()["detail"]
    assert client.patch(f"/admin/keys/{rotating.record.id}", headers={"API-Key": rotating.plaintext},
                        json={"name": "x"}).status_code == 403
    assert client.patch("/admin/keys/AAAAAAAAAAAA", headers=A, json={}).status_code == 404


def test_hourly_usage_counts_every_outcome_exactly(store, make_app):
    app = make_app(store)
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600  # only our flushes write
    client = app.test_client()
    key = issue_key(store, name="c", scopes=["data:read"], rate_limit="5/minute")
    admin = issue_key(store, name="admin", scopes=["admin"])
    h = {"API-Key": key.plaintext}
    # scope refusals first: they spend the key's quota too (3 of its 5)
    assert [client.get("/secret", headers=h).status_code for _ in range(3)] == [403] * 3
    statuses = [client.get("/data", headers=h).status_code for _ in range(4)]
    assert statuses == [200] * 2 + [429] * 2
    usage.flush()
    report = client.get(f"/admin/keys/{key.record.id}/usage", headers={"API-Key": admin.plaintext}).get_json()
    assert report["totals"] == {"accepted": 2, "refused_limit": 2, "refused_scope": 3}
    now_hour = int(time.time()) // HOUR * HOUR
    last = report["buckets"][-1]
    assert last == {"start": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now_hour)),
                    "accepted": 2, "refused_limit": 2, "refused_scope": 3}
    assert len(report["buckets"]) in (24, 25) and report["interval"] == "hour"
    assert sum(b["accepted"] for b in report["buckets"][:-1]) == 0  # zeros included, every hour
    day = client.get(f"/admin/keys/{key.record.id}/usage?interval=day", headers={"API-Key": admin.plaintext})
    assert day.get_json()["totals"] == report["totals"] and len(day.get_json()["buckets"]) in (30, 31)
    assert store.get(key.record.id).use_count == 2


def test_usage_ranges_and_bad_parameters(client, A, store):
    key = issue_key(store, name="c", scopes=["data:read"]).record
    h0 = 1_800_000_000 // HOUR * HOUR
    store.record_usage({}, {(key.id, h0): (4, 0, 0), (key.id, h0 + 3 * HOUR): (1, 1, 1)})
    url = f"/admin/keys/{key.id}/usage"
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h0 + 59))
    end = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(h0 + 3 * HOUR + 1))
    body = client.get(url, headers=A, query_string={"from": start, "to": end}).get_json()
    assert [b["accepted"] for b in body["buckets"]] == [4, 0, 0, 1]
    assert body["from"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h0))
    day = time.strftime("%Y-%m-%d", time.gmtime(h0))
    by_day = client.get(url, headers=A, query_string={"from": day, "to": day, "interval": "day"}).get_json()
    assert by_day["totals"]["accepted"] == sum(b["accepted"] for b in by_day["buckets"])
    for query, field in [({"interval": "week"}, "interval"), ({"from": "yesterday"}, "from"),
                         ({"to": "2026-13-01"}, "to"), ({"from": "2020-01-01", "to": "2019-01-01"}, "from"),
                         ({"from": "2000-01-01", "to": "2026-01-01"}, "from"), ({"from": "9" * 50}, "from")]:
        resp = client.get(url, headers=A, query_string=query)
        assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_request", (query, resp.get_data())
        assert field in resp.get_json()["detail"], query
    assert client.get("/admin/keys/AAAAAAAAAAAA/usage", headers=A).status_code == 404


def test_retention_forgets_old_hours(store):
    key = issue_key(store, name="c", scopes=["data:read"]).record
    old, recent = time.time() - 100 * 86400, time.time() - 3600
    store.record_usage({}, {(key.id, int(old) // HOUR * HOUR): (9, 0, 0), (key.id, int(recent) // HOUR * HOUR): (1, 0, 0)})
    usage = UsageRecorder(store, interval=3600, retention=90 * 86400)
    usage.hit(key.id)
    usage.flush()
    # The 100-day-old hour is gone; the last hour's count and this hour's hit stay.
    assert [u.accepted for u in store.usage(key.id, 0, 2 ** 40)] == [1, 1]
    usage.close()


def test_usage_retention_is_configurable_and_checked(tmp_path):
    from api.config import load_settings
    from keys.exc import ConfigError

    assert load_settings({"USAGE_RETENTION": "7d"}).usage_retention == 7 * 86400
    assert load_settings({}).usage_retention == 90 * 86400
    with pytest.raises(ConfigError, match="KEYGATE_USAGE_RETENTION"):
        load_settings({"USAGE_RETENTION": "forever"})


# -- the CLI --------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_update_key_and_usage_from_the_cli(env, cli_store):
    key = issue_key(cli_store, name="svc", scopes=["secret:read", "data:read"]).record
    done = run_cli(env, "update-key", key.id, "--scope", "data:read", "--rate-limit", "9/minute",
                   "--allow-ip", "10.0.0.0/8", "--expires-in", "1d", "--json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["scopes"] == ["data:read"] and shown["rate_limit"] == "9/minute"
    assert shown["allowed_ips"] == ["10.0.0.0/8"] and shown["expires_at"] is not None
    [event] = cli_store.events(key_id=key.id, event="update")
    assert event.actor.startswith("cli:")
    done = run_cli(env, "update-key", key.id, "--any-ip", "--no-expiry", "--default-rate-limit", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["allowed_ips"] == [] and json.loads(done.stdout)["expires_at"] is None
    h0 = int(time.time()) // HOUR * HOUR
    cli_store.record_usage({}, {(key.id, h0): (3, 1, 0)})
    done = run_cli(env, "usage", key.id, "--json")
    assert done.returncode == 0, done.stderr
    buckets = json.loads(done.stdout)["buckets"]
    assert len(buckets) in (168, 169) and buckets[-1]["accepted"] == 3 and buckets[-1]["refused_limit"] == 1
    text = run_cli(env, "usage", key.id, "--since", "24h")
    assert text.returncode == 0 and "total" in text.stdout and " 3 " in text.stdout


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
@pytest.mark.parametrize("args, names", [
    (("update-key", "AAAAAAAAAAAA", "--name", "x"), "no key"),
    (("update-key", "{id}"), "nothing to change"),
    (("update-key", "{id}", "--rate-limit", "5"), "--rate-limit"),
    (("update-key", "{id}", "--scope", "root"), "--scope"),
    (("update-key", "{id}", "--allow-ip", "10.0.0.0/8", "--any-ip"), "--allow-ip and --any-ip"),
    (("update-key", "{id}", "--expires-in", "1d", "--no-expiry"), "--expires-in and --no-expiry"),
    (("update-key", "{id}", "--name", "  "), "name"),
    (("usage", "{id}", "--since", "200d"), "--since"),
    (("usage", "{id}", "--since", "soon"), "--since"),
    (("usage", "nope"), "not a key id"),
])
def test_cli_refusals_are_one_line(env, cli_store, args, names):
    key = issue_key(cli_store, name="svc", scopes=["data:read"]).record
    proc = run_cli(env, *(a.replace("{id}", key.id) for a in args))
    assert_one_line_failure(proc, names=names)
    assert cli_store.get(key.id) == key


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_a_revoked_key_cannot_be_edited_from_the_cli(env, cli_store):
    key = issue_key(cli_store, name="svc", scopes=["data:read"]).record
    cli_store.revoke(key.id, time.time())
    assert_one_line_failure(run_cli(env, "update-key", key.id, "--name", "x"), names="revoked")


def test_hits_are_counted_in_their_own_hour_across_a_boundary(store):
    key = issue_key(store, name="c", scopes=["data:read"]).record.id
    usage = UsageRecorder(store, interval=3600)
    h0 = 1_800_000_000 // HOUR * HOUR
    for at in (h0 + 3599.9, h0 + 3600.0, h0 + 3600.5, h0 + 10.0, h0 + 7300.0):  # one late thread's older time
        usage.hit(key, now=at)
    usage.limited(key, now=h0 + 3600.2)
    usage.failure("insufficient_scope", key, now=h0 + 1.0)
    usage.failure("invalid_credentials", now=h0 + 1.0)  # no key: counted per code only
    usage.flush()
    assert [tuple(u) for u in store.usage(key, 0, 2 ** 40)] == [
        (h0, 2, 0, 1), (h0 + HOUR, 2, 1, 0), (h0 + 2 * HOUR, 1, 0, 0)]
    assert store.get(key).use_count == 5
    usage.close()
