"""One behavioural suite for every key store backend (memory, SQLite, PostgreSQL),
plus what only a shared SQL store must do: concurrent writers, several
connections and processes seeing one truth, failing closed when unreachable,
and never writing a plaintext key to disk."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from api.scopes import SCOPES
from conftest import ROOT
from keys import KeyRecord, StoreUnavailable, issue_key, open_store, verify_key
from keys.exc import ConfigError, KeyRevoked
from keys.keyformat import CHECKSUM_LENGTH, ID_LENGTH, PREFIX, generate_key, hash_key
from keys.store import SCHEMA_VERSION

SQL_ONLY = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
CLOSED_PG = "postgresql://postgres@127.0.0.1:1/test"


def full_record(**changes) -> KeyRecord:  # noqa: ANN003
    """A record with every field set to a non-default value."""
    key = generate_key()
    record = KeyRecord(
        id=key.key_id,
        name="Zoë's \"billing\" key 🔑",
        key_hash=hash_key(key.plaintext),
        scopes=("secret:read", "data:read"),
        created_at=1_700_000_000.123456,
        expires_at=1_800_000_000.654321,
        revoked_at=1_750_000_000.5,
        last_used_at=1_700_000_100.25,
        use_count=42,
        rate_limit="100/minute",
        allowed_ips=("10.0.0.0/8", "2001:db8::/32"),
        replaces=generate_key().key_id,
        generation=3,
    )
    return record.replace(**changes)


def minimal_record(**changes) -> KeyRecord:  # noqa: ANN003
    key = generate_key()
    record = KeyRecord(id=key.key_id, name="min", key_hash=hash_key(key.plaintext),
                       scopes=("admin",), created_at=1_700_000_000.0)
    return record.replace(**changes)


# -- every backend ------------------------------------------------------------------


def test_add_get_round_trip_preserves_every_field(store):
    record = full_record()
    store.add(record)
    assert store.get(record.id) == record
    assert store.list_keys() == [record]


def test_round_trip_of_a_record_with_defaults(store):
    record = minimal_record()
    store.add(record)
    got = store.get(record.id)
    assert got == record
    assert got.expires_at is None and got.revoked_at is None and got.last_used_at is None
    assert got.rate_limit is None and got.replaces is None
    assert got.allowed_ips == () and got.use_count == 0 and got.generation == 0


def test_issued_key_round_trips_and_verifies(store):
    issued = issue_key(store, name="issued", scopes=["data:read", "secret:read"], expires_in=3600,
                       rate_limit="10/second", allowed_ips=["192.168.0.0/16", "::1"], vocabulary=SCOPES)
    got = store.get(issued.record.id)
    assert got == issued.record
    assert got.scopes == ("secret:read", "data:read")
    assert got.allowed_ips == ("192.168.0.0/16", "::1/128")
    assert verify_key(store, issued.plaintext, now=got.created_at + 1) == got


@pytest.mark.parametrize("key_id", ["AbCdEfGh1234", "", "x", "x" * 1000, "' OR 1=1 --",
                                    "'; DROP TABLE api_keys; --", "é" * 12])
def test_get_unknown_is_none(store, key_id):
    store.add(minimal_record())
    assert store.get(key_id) is None
    assert store.count() == 1


def test_list_is_ordered_by_id_and_pages_cover_every_key_once(store):
    ids = [issue_key(store, name=f"k{i}", scopes=["secret:read"]).record.id for i in range(23)]
    listed = [r.id for r in store.list_keys()]
    assert listed == sorted(ids)
    for limit in (1, 4, 7, 23, 100):
        seen: list[str] = []
        after = None
        while page := store.list_keys(limit=limit, after=after):
            assert len(page) <= limit
            seen.extend(r.id for r in page)
            after = page[-1].id
        assert seen == sorted(ids), limit


def test_list_after_an_id_that_does_not_exist(store):
    ids = sorted(issue_key(store, name=f"k{i}", scopes=["admin"]).record.id for i in range(10))
    assert [r.id for r in store.list_keys(after=ids[4])] == ids[5:]
    assert [r.id for r in store.list_keys(after=ids[-1])] == []
    assert [r.id for r in store.list_keys(after="")] == ids
    assert [r.id for r in store.list_keys(after="zzzzzzzzzzzzz")] == []
    assert store.list_keys(limit=3, after=ids[6]) == [store.get(i) for i in ids[7:10]]


def test_list_of_an_empty_store(store):
    assert store.list_keys() == []
    assert store.list_keys(limit=10) == []
    assert store.count() == 0


def test_revoke_sets_the_time_and_bumps_the_generation(store):
    record = minimal_record()
    store.add(record)
    revision = store.revision()
    revoked = store.revoke(record.id, 1_700_000_500.0)
    assert revoked is not None
    assert revoked.revoked_at == 1_700_000_500.0
    assert revoked.generation == record.generation + 1
    assert store.get(record.id) == revoked
    assert store.revision() > revision
    # Nothing else changed.
    assert revoked.replace(revoked_at=None, generation=record.generation) == record


def test_revoking_again_later_is_idempotent_and_keeps_the_first_time(store):
    record = minimal_record()
    store.add(record)
    first = store.revoke(record.id, 1_700_000_500.0)
    revision = store.revision()
    again = store.revoke(record.id, 1_700_000_900.0)
    assert again == first
    assert store.get(record.id).revoked_at == 1_700_000_500.0
    assert store.get(record.id).generation == first.generation
    assert store.revision() == revision
    assert store.revoke(record.id, 1_700_000_500.0) == first  # the same time again: no change


def test_an_earlier_revocation_time_wins(store):
    """A rotation's grace period (future revocation) is cut short by a revoke now."""
    record = minimal_record()
    store.add(record)
    graced = store.revoke(record.id, 1_700_009_000.0)
    now = store.revoke(record.id, 1_700_000_100.0)
    assert now.revoked_at == 1_700_000_100.0
    assert now.generation > graced.generation
    assert store.get(record.id) == now


def test_revoke_unknown_is_none(store):
    store.add(minimal_record())
    revision = store.revision()
    assert store.revoke(generate_key().key_id, 1_700_000_000.0) is None
    assert store.revision() == revision
    assert store.count() == 1


def test_rotate_adds_the_new_key_and_revokes_the_old_one(store):
    old = minimal_record()
    store.add(old)
    new = minimal_record(replaces=old.id)
    result = store.rotate(new, old.id, 1_700_003_600.0)
    assert result is not None and result.id == old.id
    assert result.revoked_at == 1_700_003_600.0 and result.generation == old.generation + 1
    assert store.get(new.id) == new
    assert store.count() == 2


def test_rotate_of_an_unknown_key_writes_nothing(store):
    store.add(minimal_record())
    new = minimal_record()
    assert store.rotate(new, generate_key().key_id, 1_700_000_000.0) is None
    assert store.get(new.id) is None
    assert store.count() == 1


def test_count_includes_revoked_keys(store):
    assert store.count() == 0
    issued = [issue_key(store, name=f"k{i}", scopes=["admin"]) for i in range(5)]
    store.revoke(issued[0].record.id, 1_700_000_000.0)
    assert store.count() == 5


def test_migrate_is_idempotent(store):
    record = full_record()
    store.add(record)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION
    assert store.schema_version() == SCHEMA_VERSION
    assert store.get(record.id) == record


def test_a_fresh_store_can_be_migrated_twice(store_url):
    store = open_store(store_url)
    try:
        if store.backend != "memory":
            assert store.schema_version() == 0
        assert store.migrate() == SCHEMA_VERSION
        assert store.migrate() == SCHEMA_VERSION
        assert store.schema_version() == SCHEMA_VERSION
        assert store.count() == 0
    finally:
        store.close()


# -- SQL stores: shared by threads, connections and processes -------------------------


@SQL_ONLY
def test_concurrent_writers_all_land(store):
    threads, per_thread = 8, 25
    barrier = threading.Barrier(threads)
    issued: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                issued[n].append(issue_key(store, name=f"t{n}-{i}", scopes=["secret:read"]).record.id)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    ids = [i for per in issued for i in per]
    assert len(ids) == len(set(ids)) == threads * per_thread
    assert store.count() == threads * per_thread
    assert sorted(ids) == [r.id for r in store.list_keys()]


@SQL_ONLY
def test_concurrent_revocations_of_one_key_keep_the_earliest_time(store):
    record = minimal_record()
    store.add(record)
    times = [1_700_000_000.0 + i for i in range(16)]
    barrier = threading.Barrier(len(times))
    errors: list[BaseException] = []

    def revoke(at: float) -> None:
        try:
            barrier.wait()
            store.revoke(record.id, at)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    workers = [threading.Thread(target=revoke, args=(t,)) for t in times]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    assert store.get(record.id).revoked_at == min(times)


@SQL_ONLY
def test_a_second_store_on_the_same_url_sees_writes_at_once(store, store_url):
    other = open_store(store_url)
    try:
        probe = generate_key().key_id
        assert other.get(probe) is None  # opens the other store's connection before the writes
        issued = issue_key(store, name="shared", scopes=["secret:read"])
        assert other.get(issued.record.id) == issued.record
        assert verify_key(other, issued.plaintext) == issued.record
        assert other.count() == 1

        store.revoke(issued.record.id, 1_700_000_000.0)
        seen = other.get(issued.record.id)
        assert seen is not None and seen.revoked_at == 1_700_000_000.0
        with pytest.raises(KeyRevoked):
            verify_key(other, issued.plaintext)

        # ...and the other way round.
        second = issue_key(other, name="from-the-other", scopes=["admin"])
        assert store.get(second.record.id) == second.record
    finally:
        other.close()


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
@SQL_ONLY
def test_another_process_sees_a_revocation(store, store_url):
    issued = issue_key(store, name="cross-process", scopes=["secret:read"])
    store.revoke(issued.record.id, 1_700_000_000.0)
    script = (
        "import sys\n"
        "from keys import open_store\n"
        "record = open_store(sys.argv[1]).get(sys.argv[2])\n"
        "print(record.revoked_at)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, store_url, issued.record.id],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 1_700_000_000.0


# -- unreachable stores fail closed ---------------------------------------------------


def _every_operation(store):  # noqa: ANN001, ANN202
    record = minimal_record()
    return {
        "get": lambda: store.get(record.id),
        "list_keys": lambda: store.list_keys(limit=10),
        "count": store.count,
        "revision": store.revision,
        "schema_version": store.schema_version,
        "migrate": store.migrate,
        "add": lambda: store.add(record),
        "revoke": lambda: store.revoke(record.id, 1_700_000_000.0),
    }


@SQL_ONLY
def test_many_serving_threads_never_starve_management_writes(store_url):
    """Each serving thread holds a reader connection of its own (the hot path); sixteen of
    them — more than either write pool holds (SQLite 5+10, PostgreSQL 2+4) — must leave
    management writes their connections."""
    from keys.store.sql import SqlKeyStore

    store = SqlKeyStore(store_url, pool_timeout=2)  # an exhausted pool fails in 2 s, not 30
    store.migrate()
    issued = issue_key(store, name="many", scopes=["secret:read"])
    holding, done = threading.Barrier(17), threading.Barrier(17)
    seen: list[object] = []

    def serve() -> None:
        seen.append(store.get(issued.record.id))  # this thread's connection stays open…
        holding.wait(30)
        done.wait(30)  # …until the write below has been made

    threads = [threading.Thread(target=serve) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        holding.wait(30)
        written = issue_key(store, name="written while sixteen threads read", scopes=["data:read"])
        assert store.get(written.record.id) is not None
    finally:
        done.wait(30)
        for t in threads:
            t.join(30)
    assert seen == [store.get(issued.record.id)] * 16
    store.close()


@SQL_ONLY
def test_an_exhausted_write_pool_is_unavailable_not_an_error(store_url):
    """Every pooled connection busy (a burst of management calls): 503, never a 500."""
    from keys.store.sql import SqlKeyStore

    store = SqlKeyStore(store_url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    store.migrate()
    with store.engine.connect():  # the pool's only connection, busy
        with pytest.raises(StoreUnavailable):
            issue_key(store, name="no connection left", scopes=["data:read"])
    assert issue_key(store, name="free again", scopes=["data:read"]).record.name == "free again"
    store.close()


@pytest.mark.parametrize("operation", ["get", "list_keys", "count", "revision", "schema_version", "migrate",
                                       "add", "revoke"])
def test_postgres_on_a_closed_port_is_unavailable(operation):
    store = open_store(CLOSED_PG)
    try:
        with pytest.raises(StoreUnavailable) as info:
            _every_operation(store)[operation]()
        assert info.value.status == 503 and info.value.code == "store_unavailable"
    finally:
        store.close()


def test_unreachable_store_refuses_a_well_formed_key_rather_than_saying_unknown():
    store = open_store(CLOSED_PG)
    try:
        with pytest.raises(StoreUnavailable):
            verify_key(store, generate_key().plaintext)
        # A second attempt after the failure still fails closed (no half-broken connection reused).
        with pytest.raises(StoreUnavailable):
            verify_key(store, generate_key().plaintext)
    finally:
        store.close()


def test_sqlite_store_whose_file_was_deleted_is_unavailable(tmp_path):
    path = tmp_path / "gone" / "keygate.db"
    url = f"sqlite:///{path}"
    first = open_store(url)
    first.migrate()
    issued = issue_key(first, name="doomed", scopes=["secret:read"])
    first.close()
    for f in path.parent.iterdir():
        f.unlink()
    path.parent.rmdir()

    store = open_store(url)
    try:
        with pytest.raises(StoreUnavailable):
            store.get(issued.record.id)
        with pytest.raises(StoreUnavailable):
            verify_key(store, issued.plaintext)
        with pytest.raises(StoreUnavailable):
            store.count()
    finally:
        store.close()


def test_sqlite_path_that_is_a_directory_is_unavailable(tmp_path):
    (tmp_path / "adir").mkdir()
    store = open_store(f"sqlite:///{tmp_path / 'adir'}")
    try:
        with pytest.raises(StoreUnavailable):
            store.get(generate_key().key_id)
        with pytest.raises(StoreUnavailable):
            store.migrate()
    finally:
        store.close()


@pytest.mark.parametrize("url", ["mysql://x", "", "memory", "redis://127.0.0.1/0", "sqlite",
                                 "postgresql://u@h:notaport/db", "postgresql+nosuchdriver://h/db"])
def test_unsupported_or_unparseable_urls_are_config_errors(url):
    with pytest.raises(ConfigError) as info:
        open_store(url).get(generate_key().key_id)
    # The library names no environment variable; the service adds its own (test_http.py).
    assert "database" in str(info.value) and "KEYGATE_" not in str(info.value)


# -- SQLite never holds a plaintext key --------------------------------------------


@SQLITE_ONLY
def test_sqlite_files_never_contain_a_plaintext_key_or_secret(store, store_url):
    db = Path(store_url.removeprefix("sqlite:///"))
    issued = [issue_key(store, name=f"k{i}", scopes=["secret:read", "admin"]) for i in range(20)]
    store.revoke(issued[0].record.id, 1_700_000_000.0)
    for k in issued[1:4]:
        verify_key(store, k.plaintext)

    files = [p for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if p.exists()]
    assert db in files
    data = b"".join(p.read_bytes() for p in files)
    for k in issued:
        secret_part = k.plaintext[len(PREFIX) + ID_LENGTH : -CHECKSUM_LENGTH]
        assert k.plaintext.encode() not in data
        assert secret_part.encode() not in data
        assert k.plaintext[len(PREFIX):].encode() not in data
        # Positive control: the hash and id are there, so these really are the store's bytes.
        assert k.record.key_hash.encode() in data
        assert k.record.id.encode() in data


def test_an_unparseable_url_error_does_not_echo_the_password():
    password = generate_key().key_id
    with pytest.raises(ConfigError) as info:
        open_store(f"postgresql://keygate:{password}@db.internal:notaport/keygate")
    assert "database URL" in str(info.value)
    assert password not in str(info.value)


# -- issue 12: allow-lists stored so they can't re-split; audit summaries and retention --------


def test_an_allow_list_round_trips_entry_for_entry(store):
    record = full_record(allowed_ips=("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"))
    store.add(record)
    assert store.get(record.id).allowed_ips == record.allowed_ips
    assert store.list_keys()[0].allowed_ips == record.allowed_ips


@SQL_ONLY
def test_allow_lists_are_stored_as_json_arrays(store):
    """An entry can't be split into two on the way back (space-separated text could)."""
    import sqlalchemy as sa

    from keys.store.schema import keys_table

    record = full_record(allowed_ips=("10.0.0.0/8", "2001:db8::/32"))
    store.add(record)
    with store.engine.connect() as conn:
        stored = conn.execute(sa.select(keys_table.c.allowed_ips).where(keys_table.c.id == record.id)).scalar()
    assert stored == '["10.0.0.0/8", "2001:db8::/32"]'


@SQL_ONLY
def test_an_unreadable_stored_allow_list_admits_nobody(store):
    import sqlalchemy as sa

    from keys.store.schema import keys_table
    from keys.verify import ip_allowed

    record = full_record()
    store.add(record)
    for text in ('["10.0.0.0/8"', '{"a": 1}', "[1, 2]"):
        with store.engine.begin() as conn:
            conn.execute(keys_table.update().where(keys_table.c.id == record.id).values(allowed_ips=text))
        allowed = store.get(record.id).allowed_ips
        assert allowed and not ip_allowed(allowed, "10.0.0.1"), text


@SQL_ONLY
def test_an_upgrade_to_schema_4_converts_allow_lists_and_keeps_events(store_url):
    """A store made by the first three migrations, with data, is upgraded in place; a fresh
    install ends with the same columns (the earlier migrations' tables are frozen)."""
    import sqlalchemy as sa

    from conftest import migrate_up_to
    from keys.store.schema import audit_table
    from keys.verify import ip_allowed

    store = open_store(store_url)
    try:
        with store.engine.begin() as conn:
            migrate_up_to(conn, 3)
            conn.execute(sa.text(
                "INSERT INTO api_keys (id, name, key_hash, scopes, created_at, allowed_ips, use_count,"
                " generation) VALUES ('AAAAAAAAAAAA', 'old', :h, 'admin', 1.0, '10.0.0.0/8 ::1/128', 0, 0)"),
                {"h": "0" * 64})
            # what a zone id made of one checked entry: it would read as "anywhere" if split
            conn.execute(sa.text(
                "INSERT INTO api_keys (id, name, key_hash, scopes, created_at, allowed_ips, use_count,"
                " generation) VALUES ('BBBBBBBBBBBB', 'zone', :h, 'admin', 1.0, '::%x 0.0.0.0/0', 0, 0)"),
                {"h": "1" * 64})
            conn.execute(sa.text("INSERT INTO audit_events (at, event, key_id, actor, detail) "
                                 "VALUES (1.0, 'create', 'AAAAAAAAAAAA', 'cli:old', '{}')"))
        assert store.schema_version() == 3
        assert store.migrate() == SCHEMA_VERSION == 6  # 4 converts allow-lists; 5 (the console), 6 too
        assert store.get("AAAAAAAAAAAA").allowed_ips == ("10.0.0.0/8", "::1/128")
        zoned = store.get("BBBBBBBBBBBB").allowed_ips
        assert zoned and not any(ip_allowed(zoned, a) for a in ("0.0.0.0", "10.0.0.1", "::"))
        assert [e.actor for e in store.events()] == ["cli:old"]
        columns = {c["name"] for c in sa.inspect(store.engine).get_columns("audit_events")}
        assert columns == {c.name for c in audit_table.columns}
    finally:
        store.close()


@SQL_ONLY
def test_an_upgrade_to_schema_6_keeps_every_keys_usage(store_url):
    """Schema 6 counts usage in ``key_usage``, apart from the keys: what ``api_keys`` counted
    before (or an instance of the previous release still adds there during a rolling upgrade)
    still counts, flushes add to it, and an older flush never moves a last use back."""
    import sqlalchemy as sa

    from conftest import migrate_up_to

    store = open_store(store_url)
    try:
        with store.engine.begin() as conn:
            migrate_up_to(conn, 5)
            for key_id, count, last in (("USEDUSEDUSED", 41, 1234.5), ("IDLEIDLEIDLE", 0, None)):
                conn.execute(sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, scopes, created_at, last_used_at, use_count,"
                    " allowed_ips, generation) VALUES (:id, 'k', :h, 'admin', 1.0, :last, :n, '', 0)"),
                    {"id": key_id, "h": "0" * 64, "last": last, "n": count})
        assert store.migrate() == SCHEMA_VERSION == 6
        used, idle = store.get("USEDUSEDUSED"), store.get("IDLEIDLEIDLE")
        assert (used.use_count, used.last_used_at) == (41, 1234.5)
        assert (idle.use_count, idle.last_used_at) == (0, None)
        store.record_usage({"USEDUSEDUSED": (2000.0, 1), "IDLEIDLEIDLE": (1500.0, 2)})
        store.record_usage({"USEDUSEDUSED": (1000.0, 1)})  # a flush that was slower to arrive
        with store.engine.begin() as conn:  # the previous release's flush, during the upgrade
            conn.execute(sa.text("UPDATE api_keys SET use_count = use_count + 5, last_used_at = 1800.0"
                                 " WHERE id = 'IDLEIDLEIDLE'"))
        used, idle = store.get("USEDUSEDUSED"), store.get("IDLEIDLEIDLE")
        assert (used.use_count, used.last_used_at) == (43, 2000.0)
        assert (idle.use_count, idle.last_used_at) == (7, 1800.0)
        assert [(r.id, r.use_count) for r in store.list_keys()] == [("IDLEIDLEIDLE", 7), ("USEDUSEDUSED", 43)]
        with store.engine.connect() as conn:  # the key table's pages were not written by a flush
            assert conn.exec_driver_sql("SELECT use_count FROM api_keys WHERE id = 'USEDUSEDUSED'").scalar() == 41
    finally:
        store.close()


def _merge(summary, detail):  # noqa: ANN001, ANN202
    return {"n": (summary or {}).get("n", 0) + 1, "last": detail["x"]}


def test_a_summarised_event_is_one_row_per_key_actor_and_period(store):
    from keys.model import AuditEvent

    for i in range(5):
        store.summarize(AuditEvent("mint_token", "AAAAAAAAAAAA", "key:a", 100.0 + i, {"x": i}), 1, _merge)
    store.summarize(AuditEvent("mint_token", "AAAAAAAAAAAA", "key:b", 200.0, {"x": 9}), 1, _merge)
    store.summarize(AuditEvent("mint_token", "AAAAAAAAAAAA", "key:a", 4000.0, {"x": 7}), 2, _merge)
    store.summarize(AuditEvent("mint_token", "BBBBBBBBBBBB", "key:a", 300.0, {"x": 8}), 1, _merge)
    events = store.events(limit=100)
    assert len(events) == 4
    first = [e for e in events if e.key_id == "AAAAAAAAAAAA" and e.actor == "key:a" and e.at < 1000]
    assert len(first) == 1 and first[0].detail == {"n": 5, "last": 4} and first[0].at == 100.0


@SQL_ONLY
def test_concurrent_summaries_of_one_period_all_count(store):
    from keys.model import AuditEvent

    def mint() -> None:
        for _ in range(10):
            store.summarize(AuditEvent("mint_token", "AAAAAAAAAAAA", "key:a", 100.0, {"x": 1}), 1, _merge)

    threads = [threading.Thread(target=mint) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (event,) = store.events()
    assert event.detail["n"] == 40


def test_prune_deletes_old_events_in_batches_and_keeps_the_rest(store):
    from keys.model import AuditEvent

    for i in range(25):
        store.record_event(AuditEvent("create", "AAAAAAAAAAAA", "cli:t", 1000.0 + i))
    assert store.prune_events(1010.0, batch=4) == 4
    assert store.prune_events(1010.0, batch=100) == 6
    assert store.prune_events(1010.0) == 0
    assert sorted(e.at for e in store.events(limit=100)) == [1000.0 + i for i in range(10, 25)]
    # ids keep growing after a prune, so paging with `before` still works
    store.record_event(AuditEvent("revoke", "AAAAAAAAAAAA", "cli:t", 2000.0))
    newest = store.events(limit=1)[0]
    assert newest.event == "revoke" and newest.id > max(e.id for e in store.events(limit=100)[1:])


def test_audit_actors_are_stored_escaped_and_bounded(store):
    from keys.model import AuditEvent

    store.record_event(AuditEvent("create", "AAAAAAAAAAAA", "cli:evil\nline2\x1b[31m\u202e" + "x" * 500, 1.0))
    (event,) = store.events()
    assert event.actor.startswith("cli:evil\\nline2\\x1b[31m\\u202e")
    assert event.actor.isprintable() and len(event.actor) == 120


@SQL_ONLY
def test_database_errors_never_show_their_parameters(store):
    """A key's hash, in particular, never reaches an error message or a log line."""
    import sqlalchemy as sa

    record = full_record()
    store.add(record)
    with pytest.raises(sa.exc.IntegrityError) as info:
        store.add(record)  # the same id again
    assert record.key_hash not in str(info.value)
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(info.value)
