"""What issue 14 added to every key store backend (memory, SQLite, PostgreSQL): editing a key
in place, hourly usage counts, console sessions, filtered listings and audit filters; and the
schema migration that brought the tables, on a fresh store and on one from before it."""

from __future__ import annotations

import time
import uuid

import pytest
import sqlalchemy as sa

from conftest import migrate_up_to
from keys import issue_key, open_store
from keys.issuing import update_key
from keys.model import AuditEvent, KeyFilter, SessionRecord
from keys.store import SCHEMA_VERSION
from keys.store.schema import metadata

SQL_ONLY = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
HOUR = 3600


def test_update_changes_fields_bumps_the_revision_and_audits(store):
    key = issue_key(store, name="a", scopes=["secret:read", "data:read"]).record
    revision = store.revision()
    event = AuditEvent("update", key.id, "test", time.time(), {"changed": {"name": {"from": "a", "to": "b"}}})
    updated = store.update(key.id, {"name": "b", "scopes": ("data:read",), "allowed_ips": ("10.0.0.0/8",),
                                    "rate_limit": "5/minute", "expires_at": 2_000_000_000.5}, event)
    assert updated == store.get(key.id)
    assert (updated.name, updated.scopes, updated.allowed_ips, updated.rate_limit, updated.expires_at) == (
        "b", ("data:read",), ("10.0.0.0/8",), "5/minute", 2_000_000_000.5)
    assert updated.generation == key.generation  # tokens kept unless asked
    assert store.revision() > revision  # every verification cache lets go of the old record
    assert store.events(key_id=key.id, event="update")[0].detail == event.detail
    cleared = store.update(key.id, {"allowed_ips": (), "rate_limit": None, "expires_at": None},
                           bump_generation=True)
    assert (cleared.allowed_ips, cleared.rate_limit, cleared.expires_at) == ((), None, None)
    assert cleared.generation == key.generation + 1


def test_update_of_a_revoked_or_unknown_key_writes_nothing(store):
    key = issue_key(store, name="a", scopes=["secret:read"]).record
    store.revoke(key.id, time.time() + 3600)  # a rotation's grace: revoked in an hour
    revision = store.revision()
    assert store.update(key.id, {"name": "b"}) is None
    assert store.update("AAAAAAAAAAAA", {"name": "b"}) is None
    assert store.get(key.id).name == "a" and store.revision() == revision


def test_update_key_validates_audits_the_change_and_refuses_revoked_keys(store):
    from keys.exc import Conflict, InvalidRequest

    key = issue_key(store, name="a", scopes=["secret:read", "data:read"]).record
    for bad in ({"name": ""}, {"scopes": []}, {"scopes": None}, {"rate_limit": "5"}, {"allowed_ips": ["nope"]},
                {"allowed_ips": "10.0.0.0/8"}, {"expires_in": 0}, {"expires_in": True}, {"colour": "red"}):
        with pytest.raises(InvalidRequest):
            update_key(store, key.id, bad)
    assert store.get(key.id) == key
    assert update_key(store, key.id, {"name": "a"}) == key  # nothing changed, nothing written
    assert [e.event for e in store.events(key_id=key.id)] == ["create"]
    narrowed = update_key(store, key.id, {"scopes": ["data:read"], "expires_in": 60}, actor="test", now=1000.0)
    assert narrowed.scopes == ("data:read",) and narrowed.expires_at == 1060.0
    assert narrowed.generation == key.generation + 1  # narrowed: its query tokens die
    [event] = store.events(key_id=key.id, event="update")
    assert event.actor == "test"
    assert event.detail == {"changed": {"scopes": {"from": ["secret:read", "data:read"], "to": ["data:read"]},
                                        "expires_at": {"from": None, "to": "1970-01-01T00:17:40Z"}}}
    widened = update_key(store, key.id, {"scopes": ["data:read", "secret:read"]})
    assert widened.generation == narrowed.generation  # nothing a token holds was taken away
    store.revoke(key.id, time.time())
    with pytest.raises(Conflict):
        update_key(store, key.id, {"name": "b"})


def test_hourly_usage_adds_up_per_key_and_hour_and_is_purged_by_age(store):
    a = issue_key(store, name="a", scopes=["data:read"]).record.id
    b = issue_key(store, name="b", scopes=["data:read"]).record.id
    h0 = 1_800_000_000 // HOUR * HOUR
    store.record_usage({a: (h0 + 5.0, 3)}, {(a, h0): (3, 1, 0), (b, h0): (0, 0, 2)})
    store.record_usage({}, {(a, h0): (2, 0, 1), (a, h0 + HOUR): (7, 0, 0)})  # a second worker's flush
    assert [tuple(u) for u in store.usage(a, h0, h0 + 2 * HOUR)] == [(h0, 5, 1, 1), (h0 + HOUR, 7, 0, 0)]
    assert [tuple(u) for u in store.usage(a, h0 + HOUR, h0 + 2 * HOUR)] == [(h0 + HOUR, 7, 0, 0)]
    assert [tuple(u) for u in store.usage(b, 0, 2 ** 40)] == [(h0, 0, 0, 2)]
    assert store.get(a).use_count == 3
    assert store.purge_usage(h0 + HOUR) == 2
    assert [tuple(u) for u in store.usage(a, 0, 2 ** 40)] == [(h0 + HOUR, 7, 0, 0)]
    assert store.usage(b, 0, 2 ** 40) == []


def test_sessions_are_stored_touched_ended_and_purged(store):
    s = SessionRecord("a" * 64, "AAAAAAAAAAAA", 1000.0, 1000.0, "c" * 64)
    old = SessionRecord("b" * 64, "BBBBBBBBBBBB", 10.0, 10.0, "d" * 64)
    store.add_session(s)
    store.add_session(old)
    assert store.get_session(s.id_hash) == s
    assert store.get_session("0" * 64) is None
    store.touch_session(s.id_hash, 1500.0)
    store.touch_session(s.id_hash, 1200.0)  # a slower request's older time never moves it back
    assert store.get_session(s.id_hash).last_seen_at == 1500.0
    assert store.purge_sessions(idle_before=100.0, created_before=0.0) == 1
    assert store.get_session(old.id_hash) is None
    store.delete_session(s.id_hash)
    store.delete_session(s.id_hash)  # harmless
    assert store.get_session(s.id_hash) is None


def test_filtered_listings_agree_with_the_filter_on_every_backend(store):
    now = time.time()
    made = [
        issue_key(store, name="Billing 100%", scopes=["data:read"]).record,
        issue_key(store, name="billing_two", scopes=["secret:read", "admin"]).record,
        issue_key(store, name="reports", scopes=["data:read"], expires_in=1, now=now - 10).record,
        issue_key(store, name="old", scopes=["data:read"]).record,
        issue_key(store, name="rotating", scopes=["data:read"]).record,
    ]
    store.revoke(made[3].id, now - 1)
    store.revoke(made[4].id, now + 3600)
    filters = [KeyFilter(name="BILL", now=now), KeyFilter(name="100%", now=now), KeyFilter(name="g_t", now=now),
               KeyFilter(name="%", now=now), KeyFilter(scope="admin", now=now), KeyFilter(scope="data", now=now),
               KeyFilter(scope="data:read", state="active", now=now)]
    filters += [KeyFilter(state=state, now=now) for state in ("active", "grace", "revoked", "expired")]
    everything = store.list_keys()
    for where in filters:
        expected = [k.id for k in everything if where.matches(k)]
        assert [k.id for k in store.list_keys(where=where)] == expected, where
    assert {k.state(now) for k in everything} == {"active", "grace", "revoked", "expired"}
    first = store.list_keys(where=KeyFilter(scope="data:read", now=now), limit=1)
    rest = store.list_keys(where=KeyFilter(scope="data:read", now=now), after=first[0].id)
    assert len(first) + len(rest) == 4


def test_events_filter_by_kind(store):
    key = issue_key(store, name="a", scopes=["data:read"]).record
    store.revoke(key.id, time.time(), AuditEvent("revoke", key.id, "t", time.time()))
    assert [e.event for e in store.events(event="revoke")] == ["revoke"]
    assert [e.event for e in store.events(key_id=key.id, event="create")] == ["create"]
    assert store.events(event="rotate") == []


# -- the migration ---------------------------------------------------------------------


def _columns(engine: sa.Engine) -> dict[str, dict[str, tuple[str, bool, bool]]]:
    inspector = sa.inspect(engine)
    return {table: {c["name"]: (str(c["type"]).split("(")[0], c["nullable"], c.get("primary_key", False))
                    for c in inspector.get_columns(table)}
            for table in inspector.get_table_names()}


@SQL_ONLY
def test_the_migrations_build_exactly_the_live_tables(store, store_url, tmp_path):
    """Each migration has its own frozen DDL; run in order on an empty store they must give what
    the live definitions (which queries use) describe, so neither can drift from the other."""
    migrated = store.engine
    schema = "kg_expected_" + uuid.uuid4().hex[:12]
    if store.backend == "sqlite":
        expected = sa.create_engine(f"sqlite:///{tmp_path / 'expected.db'}")
    else:  # the live definitions, created in a schema of their own beside the migrated one
        expected = sa.create_engine(migrated.url.set(query={}), connect_args={"options": f"-csearch_path={schema}"})
        with expected.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        metadata.create_all(expected)
        assert _columns(migrated) == _columns(expected)
        assert {i["name"] for t in ("usage_hourly", "console_sessions", "audit_events")
                for i in sa.inspect(migrated).get_indexes(t)} == \
            {i["name"] for t in ("usage_hourly", "console_sessions", "audit_events")
             for i in sa.inspect(expected).get_indexes(t)}
    finally:
        if store.backend != "sqlite":
            with expected.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        expected.dispose()


@SQL_ONLY
def test_a_store_from_before_the_console_is_upgraded_in_place(store_url):
    """A store at schema 3 (as the previous release left it) keeps its keys and gains the
    usage and session tables: `init` on an existing store."""
    store = open_store(store_url)
    try:
        with store.engine.begin() as conn:
            migrate_up_to(conn, 3)
        assert store.schema_version() == 3
        key = issue_key(store, name="kept", scopes=["data:read"]).record
        assert store.migrate() == SCHEMA_VERSION == 6
        assert store.get(key.id) == key
        store.record_usage({key.id: (time.time(), 1)}, {(key.id, 0): (1, 0, 0)})
        assert store.usage(key.id, 0, 1)[0].accepted == 1
        store.add_session(SessionRecord("e" * 64, key.id, 1.0, 1.0, "f" * 64))
        assert store.get_session("e" * 64) is not None
    finally:
        store.close()
