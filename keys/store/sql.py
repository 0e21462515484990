"""The SQL store: SQLAlchemy Core for schema and writes, raw DBAPI on the hot path.

SQLAlchemy Core costs ~15 µs per ``select`` on this machine, the driver itself
~5 µs, and ``get`` runs on every request; so ``get`` executes the statement
SQLAlchemy compiled once, on a per-thread driver connection in autocommit mode.
Everything else goes through Core and works unchanged on SQLite and PostgreSQL.
On PostgreSQL no call waits long for a database that stopped answering: every connection
is bounded (pgconn.py) and a breaker (breaker.py) answers 503 at once meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from ..exc import ConfigError, InvalidRequest, StoreUnavailable
from ..files import private_dir, private_file
from ..model import AuditEvent, KeyFilter, KeyRecord
from .base import SCHEMA_VERSION, KeyStore, Merge
from .breaker import Breaker, OutageLog
from .schema import (
    MIGRATIONS,
    audit_table,
    dump_networks,
    failures_table,
    keys_table,
    load_networks,
    revision_table,
    schema_table,
    usage_totals_table,
)
from .sql_sessions import SqlSessions
from .sql_usage import SqlUsage

_COLUMNS = [c.name for c in keys_table.columns]


assert _COLUMNS == list(KeyRecord._fields), "api_keys columns and KeyRecord fields must line up"

_k, _t = keys_table.c, usage_totals_table.c
# A record: its key's row, with the usage that ``key_usage`` counted since (schema 6) added to
# what the row itself holds (counted before schema 6, or carried over by an import).
_RECORDS = sa.select(*[
    (_k.use_count + sa.func.coalesce(_t.use_count, sa.literal_column("0"))).label(name)
    if name == "use_count" else
    sa.case((_t.last_used_at.is_(None), _k.last_used_at),
            (sa.or_(_k.last_used_at.is_(None), _k.last_used_at < _t.last_used_at), _t.last_used_at),
            else_=_k.last_used_at).label(name)
    if name == "last_used_at" else _k[name]
    for name in _COLUMNS
]).select_from(keys_table.outerjoin(usage_totals_table, _t.key_id == _k.id))


def _row_to_record(row: Any) -> KeyRecord:
    (key_id, name, key_hash, scopes, created_at, expires_at, revoked_at, last_used_at,
     use_count, rate_limit, allowed_ips, replaces, generation) = row
    return KeyRecord(key_id, name, key_hash, tuple(scopes.split()), created_at, expires_at,
                     revoked_at, last_used_at, use_count, rate_limit,
                     load_networks(allowed_ips), replaces, generation)


def _record_to_row(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "key_hash": record.key_hash,
        "scopes": " ".join(record.scopes),
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "last_used_at": record.last_used_at,
        "use_count": record.use_count,
        "rate_limit": record.rate_limit,
        "allowed_ips": dump_networks(record.allowed_ips),
        "replaces": record.replaces,
        "generation": record.generation,
    }


def _configure_sqlite(engine: sa.Engine) -> None:
    """WAL for concurrent readers, a busy timeout for concurrent writers, and
    real transactions (pysqlite's legacy mode would autocommit DDL)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 10000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = FULL")  # a printed key survives power loss
        # Reads through the OS page cache (shared by all workers) instead of read() calls;
        # measured -2..-5 µs per lookup with a million keys.
        cur.execute("PRAGMA mmap_size = 268435456")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front (IMMEDIATE): no upgrade deadlocks between them.
        read_only = conn.get_execution_options().get("keygate_read_only")
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _insert_event(conn: sa.Connection, event: AuditEvent | None) -> None:
    if event is not None:
        conn.execute(audit_table.insert().values(
            at=event.at, event=event.event, key_id=event.key_id, actor=event.actor,
            detail=json.dumps(event.detail, sort_keys=True),
        ))


def _bump_revision(conn: sa.Connection) -> None:
    r = revision_table.c
    conn.execute(revision_table.update().where(r.id == 1).values(revision=r.revision + 1))


def _revoke(conn: sa.Connection, key_id: str, at: float) -> KeyRecord | None:
    k = keys_table.c
    changed = conn.execute(
        keys_table.update()
        .where(k.id == key_id)
        .where(sa.or_(k.revoked_at.is_(None), k.revoked_at > at))
        .values(revoked_at=at, generation=k.generation + 1)
    ).rowcount
    if changed:
        _bump_revision(conn)
    row = conn.execute(_RECORDS.where(k.id == key_id)).first()
    return None if row is None else _row_to_record(row)


# Failures that mean "the database can't serve this now": 503, never 500. A pool timeout
# means every pooled connection is busy, which a client should also retry.
_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
#: SQLSTATE of a write refused by a read-only database (a standby after a failover).
_READ_ONLY = "25006"


def _is_unavailable(e: Exception) -> bool:
    if isinstance(e, _UNAVAILABLE):
        return True
    return isinstance(e, sa.exc.DBAPIError) and getattr(e.orig, "sqlstate", None) == _READ_ONLY


_a = audit_table.c
# Built once: a statement built per call costs more than the database's part of a mint.
_FIND_SUMMARY = sa.select(_a.id, _a.detail).where(
    _a.key_id == sa.bindparam("key_id"), _a.event == sa.bindparam("event"),
    _a.actor == sa.bindparam("actor"), _a.period == sa.bindparam("period"))
_FIND_SUMMARY_LOCKED = _FIND_SUMMARY.with_for_update()  # SQLite's BEGIN IMMEDIATE serialises already
_UPDATE_SUMMARY = audit_table.update().where(_a.id == sa.bindparam("row_id")).values(
    detail=sa.bindparam("new_detail"))


def _insert_summary(conn: sa.Connection, event: AuditEvent, period: int, merge: Merge) -> None:
    found = _FIND_SUMMARY_LOCKED if conn.dialect.name == "postgresql" else _FIND_SUMMARY
    row = conn.execute(found, {"key_id": event.key_id, "event": event.event, "actor": event.actor,
                               "period": period}).first()
    if row is None:
        conn.execute(audit_table.insert().values(
            at=event.at, event=event.event, key_id=event.key_id, actor=event.actor, period=period,
            detail=json.dumps(merge(None, event.detail), sort_keys=True)))
    else:
        detail = json.dumps(merge(json.loads(row.detail), event.detail), sort_keys=True)
        conn.execute(_UPDATE_SUMMARY, {"row_id": row.id, "new_detail": detail})


class _ReaderState(threading.local):
    """Each thread's own hot-path connection and cursor."""

    conn: Any = None
    cursor: Any = None


def _filtered(stmt: sa.Select[Any], where: KeyFilter) -> sa.Select[Any]:
    """``where`` as SQL: the same answers as ``KeyFilter.matches``."""
    k = keys_table.c
    if where.name is not None:
        stmt = stmt.where(sa.func.lower(k.name).contains(where.name.lower(), autoescape=True))
    if where.scope is not None:  # scopes are stored space-separated
        padded = sa.literal(" ") + k.scopes + sa.literal(" ")
        stmt = stmt.where(padded.contains(f" {where.scope} ", autoescape=True))
    now = where.now
    revoked = sa.and_(k.revoked_at.is_not(None), k.revoked_at <= now)
    expired = sa.and_(k.expires_at.is_not(None), k.expires_at <= now)
    if where.state == "revoked":
        stmt = stmt.where(revoked)
    elif where.state == "expired":
        stmt = stmt.where(sa.not_(revoked), expired)
    elif where.state == "grace":
        stmt = stmt.where(k.revoked_at > now, sa.not_(expired))
    elif where.state == "active":
        stmt = stmt.where(k.revoked_at.is_(None), sa.not_(expired))
    return stmt


class SqlKeyStore(SqlUsage, SqlSessions, KeyStore):
    def __init__(self, url: str, **engine_options: Any) -> None:
        try:
            sa_url = sa.make_url(url)
        except (sa.exc.ArgumentError, ValueError):  # ValueError: a non-numeric port
            shown = re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)  # never echo a password
            raise ConfigError(f"cannot parse the database URL {shown!r}") from None
        if sa_url.get_backend_name() == "postgresql" and sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        self.backend = sa_url.get_backend_name()
        if self.backend == "sqlite" and sa_url.database not in (None, "", ":memory:"):
            # The file, and so its WAL and shared-memory files (SQLite gives them the file's
            # mode), readable by the owner only, whatever the umask.
            database = os.path.abspath(sa_url.database)
            try:
                private_dir(os.path.dirname(database))
                private_file(database)
            except OSError:
                pass  # unwritable here: SQLite's own error, on first use, says so
        # Parameters never reach a log or an error message (they include key hashes).
        engine_options = {"hide_parameters": True, **engine_options}
        bounded = sa_url.drivername == "postgresql+psycopg"  # keygate's driver (pgconn.py)
        if self.backend == "postgresql":
            # Per worker: one reader connection per serving thread (held) plus a small pool
            # for management writes; pre-ping survives a database restart.
            engine_options = {"pool_size": 2, "max_overflow": 4, "pool_pre_ping": True,
                              "pool_recycle": 1800, **engine_options}
            if bounded:
                from . import pgconn  # psycopg is imported only for PostgreSQL

                engine_options.setdefault("connect_args", pgconn.connect_args(sa_url))
        self._breaker = Breaker()
        try:
            self.engine = sa.create_engine(sa_url, **engine_options)
            # Hot-path readers are held one per serving thread, outside the write pool, so
            # any number of threads can read without starving management writes. (An
            # in-memory SQLite database exists once per engine: it has to share.)
            in_memory = self.backend == "sqlite" and sa_url.database in (None, "", ":memory:")
            self._readers = self.engine if in_memory else sa.create_engine(
                sa_url, poolclass=sa.pool.NullPool, hide_parameters=True,
                connect_args=engine_options.get("connect_args", {}))
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
            raise ConfigError(f"unsupported database URL ({e})") from None
        if self.backend == "sqlite":
            _configure_sqlite(self.engine)
            if self._readers is not self.engine:
                _configure_sqlite(self._readers)
        if self.backend == "postgresql" and bounded:
            for engine in (self.engine, self._readers):
                pgconn.bound(engine, lambda: self._breaker)
        self._log_outage = OutageLog()
        self.url = sa_url.render_as_string(hide_password=True)

        stmt = _RECORDS.where(keys_table.c.id == sa.bindparam("key_id"))
        compiled = stmt.compile(dialect=self.engine.dialect)
        self._get_sql = str(compiled)
        self._positional = compiled.positional
        rev = sa.select(revision_table.c.revision).where(revision_table.c.id == 1)
        self._revision_sql = str(rev.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        self._local = _ReaderState()
        self._open_readers: set[Any] = set()  # every thread's, so close() can close them all
        self._readers_lock = threading.Lock()
        self._decoded: dict[str, tuple[Any, KeyRecord]] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    # -- hot path -------------------------------------------------------------

    def _reader(self) -> Any:
        conn = self._local.conn
        if conn is None:
            fairy = self._readers.raw_connection()
            conn = fairy.driver_connection
            assert conn is not None  # a live pooled connection has its driver's
            if self._readers is not self.engine:
                fairy.detach()  # the thread owns it now; it closes when the thread's state goes
            if self.backend != "sqlite":
                conn.autocommit = True  # each read sees the latest commit, holds no snapshot
            self._local.conn = conn
            with self._readers_lock:
                self._open_readers.add(conn)
        return conn

    def _fetch_one(self, sql: str, params: Any) -> Any:
        if not self._breaker.allow():
            raise StoreUnavailable()
        # A held connection may have died (database restart, idle timeout): one retry
        # on a fresh connection, then the outage is reported; none after a timeout (the
        # breaker tripped), which would double the wait.
        for attempt in (1, 2):
            try:
                cur = self._local.cursor
                if cur is None:
                    cur = self._local.cursor = self._reader().cursor()
                cur.execute(sql, params)
                return cur.fetchone()
            except Exception as e:
                self._drop_reader()
                if not isinstance(e, self.engine.dialect.loaded_dbapi.Error):
                    raise
                if attempt == 2 or self._breaker.tripped:
                    self._log_outage(e)
                    raise StoreUnavailable() from e

    def get(self, key_id: str) -> KeyRecord | None:
        row = self._fetch_one(self._get_sql, (key_id,) if self._positional else {"key_id": key_id})
        if row is None:
            return None
        # The store is asked every time; only turning an unchanged row into a record is
        # skipped (a tuple comparison instead of building a KeyRecord).
        seen = self._decoded.get(key_id)
        if seen is not None and seen[0] == row:
            return seen[1]
        record = _row_to_record(row)
        if len(self._decoded) >= 10_000:
            self._decoded.clear()
        self._decoded[key_id] = (tuple(row), record)
        return record

    def revision(self) -> int:
        row = self._fetch_one(self._revision_sql, ())
        return 0 if row is None else int(row[0])

    def _drop_reader(self) -> None:
        conn = self._local.conn
        self._local.conn = self._local.cursor = None
        if conn is not None:
            with self._readers_lock:
                self._open_readers.discard(conn)
            try:
                conn.close()
            except Exception:
                pass  # already broken: that is why it is being dropped

    def _after_fork(self) -> None:
        # A connection inherited from the parent must never be used (or closed) by the child.
        self._local = _ReaderState()
        self._open_readers = set()
        self._readers_lock = threading.Lock()
        self._breaker = Breaker()
        self.engine.dispose(close=False)

    def _unavailable(self, e: Exception) -> StoreUnavailable:
        self._log_outage(e)
        return StoreUnavailable()

    # -- management -------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A write transaction; SQLite takes its write lock up front (BEGIN IMMEDIATE)."""
        if not self._breaker.allow():
            raise StoreUnavailable()
        try:
            with self.engine.begin() as conn:
                yield conn
        except Exception as e:
            if _is_unavailable(e):  # a read-only database too: a failover to a standby
                raise self._unavailable(e) from e
            raise

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        if not self._breaker.allow():
            raise StoreUnavailable()
        try:
            with self.engine.connect() as conn:
                conn.execution_options(keygate_read_only=True)
                yield conn
        except Exception as e:
            if _is_unavailable(e):
                raise self._unavailable(e) from e
            raise

    def schema_version(self) -> int:
        with self._read() as conn:
            if not sa.inspect(conn).has_table(schema_table.name):
                return 0
            return conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0

    def migrate(self) -> int:
        with self._write() as conn:
            if self.backend == "postgresql":
                # Not a request: waits as long as it takes (another `init`'s lock, a big table).
                conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
                driver: Any = conn.connection.driver_connection
                if hasattr(driver, "io_timeout"):
                    driver.io_timeout = None  # this connection, until just before the commit
                # Concurrent `init`s queue here instead of racing on CREATE TABLE.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7347234)"))
            schema_table.create(conn, checkfirst=True)
            current = conn.execute(sa.select(sa.func.max(schema_table.c.version))).scalar() or 0
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"the key store is at schema version {current}, newer than this keygate "
                    f"({SCHEMA_VERSION}); upgrade keygate"
                )
            for version, _what, apply in MIGRATIONS:
                if version > current:
                    apply(conn)
                    conn.execute(schema_table.insert().values(version=version, applied_at=time.time()))
                    current = version
            driver = conn.connection.driver_connection
            if "io_timeout" in getattr(driver, "__dict__", {}):
                del driver.io_timeout  # back to the class's bound
        return current

    def add(self, record: KeyRecord, event: AuditEvent | None = None) -> None:
        with self._write() as conn:
            conn.execute(keys_table.insert().values(**_record_to_row(record)))
            _insert_event(conn, event)

    def list_keys(self, *, limit: int | None = None, after: str | None = None,
                  where: KeyFilter | None = None) -> list[KeyRecord]:
        stmt = _RECORDS.order_by(keys_table.c.id)
        if where is not None:
            stmt = _filtered(stmt, where)
        if after is not None:
            stmt = stmt.where(keys_table.c.id > after)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read() as conn:
            return [_row_to_record(row) for row in conn.execute(stmt)]

    def revoke(self, key_id: str, at: float, event: AuditEvent | None = None) -> KeyRecord | None:
        with self._write() as conn:
            record = _revoke(conn, key_id, at)
            if record is not None:
                _insert_event(conn, event)
        return record

    def rotate(
        self, new: KeyRecord, old_id: str, old_revoked_at: float, events: Sequence[AuditEvent] = ()
    ) -> KeyRecord | None:
        with self._write() as conn:
            old = _revoke(conn, old_id, old_revoked_at)
            if old is None:
                return None
            conn.execute(keys_table.insert().values(**_record_to_row(new)))
            for audit_event in events:
                _insert_event(conn, audit_event)
        return old

    def update(self, key_id: str, changes: Mapping[str, Any], event: AuditEvent | None = None,
               *, bump_generation: bool = False) -> KeyRecord | None:
        k = keys_table.c
        as_row = _record_to_row(KeyRecord("", "", "", (), 0.0)._replace(**changes))  # columns' spelling
        values: dict[str, Any] = {name: as_row[name] for name in changes}
        if bump_generation:
            values["generation"] = k.generation + 1
        with self._write() as conn:
            changed = conn.execute(
                keys_table.update().where(k.id == key_id, k.revoked_at.is_(None)).values(**values)
            ).rowcount
            if not changed:
                return None
            _bump_revision(conn)
            _insert_event(conn, event)
            row = conn.execute(_RECORDS.where(k.id == key_id)).first()
        return None if row is None else _row_to_record(row)

    def record_event(self, event: AuditEvent) -> None:
        with self._write() as conn:
            _insert_event(conn, event)

    def summarize(self, event: AuditEvent, period: int, merge: Merge) -> None:
        for attempt in (1, 2):
            try:
                with self._write() as conn:
                    _insert_summary(conn, event, period, merge)
                return
            except sa.exc.IntegrityError:
                # PostgreSQL: another worker inserted this period's row first; now it exists.
                if attempt == 2:
                    raise

    def prune_events(self, before: float, batch: int = 1000) -> int:
        a = audit_table.c
        oldest = sa.select(a.id).where(a.at < before).order_by(a.at).limit(batch).scalar_subquery()
        with self._write() as conn:
            return conn.execute(audit_table.delete().where(a.id.in_(oldest))).rowcount

    def events(
        self, *, key_id: str | None = None, limit: int = 100, before: int | None = None,
        event: str | None = None,
    ) -> list[AuditEvent]:
        a = audit_table.c
        stmt = sa.select(audit_table).order_by(a.id.desc()).limit(limit)
        if key_id is not None:
            stmt = stmt.where(a.key_id == key_id)
        if event is not None:
            stmt = stmt.where(a.event == event)
        if before is not None:
            stmt = stmt.where(a.id < before)
        with self._read() as conn:
            return [
                AuditEvent(event=r.event, key_id=r.key_id, actor=r.actor, at=r.at,
                           detail=json.loads(r.detail), id=r.id)
                for r in conn.execute(stmt)
            ]

    def add_auth_failures(self, counts: Mapping[str, int]) -> None:
        if not counts:
            return
        f = failures_table.c
        with self._write() as conn:
            for code, n in sorted(counts.items()):
                updated = conn.execute(
                    failures_table.update().where(f.code == code).values(count=f.count + n)
                ).rowcount
                if not updated:
                    conn.execute(failures_table.insert().values(code=code, count=n))

    def auth_failures(self) -> dict[str, int]:
        with self._read() as conn:
            return {code: count for code, count in conn.execute(sa.select(failures_table))}

    def count(self) -> int:
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(keys_table)).scalar_one()

    def key_states(self, now: float, expiring_by: float) -> dict[str, int]:
        k = keys_table.c
        revoked = sa.and_(k.revoked_at.is_not(None), k.revoked_at <= now)
        expired = sa.and_(sa.not_(revoked), k.expires_at.is_not(None), k.expires_at <= now)
        live = sa.and_(sa.not_(revoked), sa.or_(k.expires_at.is_(None), k.expires_at > now))
        grace = sa.and_(live, k.revoked_at.is_not(None))

        def total(condition: Any) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        stmt = sa.select(total(revoked), total(expired), total(grace), sa.func.count(),
                         total(sa.and_(live, k.expires_at.is_not(None), k.expires_at <= expiring_by)))
        with self._read() as conn:
            revoked_n, expired_n, grace_n, all_n, expiring_n = conn.execute(stmt).one()
        return {"active": all_n - revoked_n - expired_n - grace_n, "grace": int(grace_n),
                "revoked": int(revoked_n), "expired": int(expired_n), "expiring": int(expiring_n)}

    def load(self, records: Iterable[KeyRecord], events: Iterable[AuditEvent] = (),
             auth_failures: Mapping[str, int] | None = None) -> int:
        written = 0
        with self._write() as conn:
            if self.backend == "postgresql":  # two imports at once: the second waits, then refuses
                conn.execute(sa.text(f"LOCK TABLE {keys_table.name} IN SHARE ROW EXCLUSIVE MODE"))
            present = conn.execute(sa.select(sa.func.count()).select_from(keys_table)).scalar_one()
            if present:
                raise InvalidRequest(f"the store already holds {present} keys; "
                                     "import loads into an empty store only")
            batch: list[dict[str, Any]] = []
            for record in records:
                batch.append(_record_to_row(record))
                if len(batch) == 5000:
                    written += self._insert_keys(conn, batch)
            written += self._insert_keys(conn, batch)
            for audit_event in events:
                _insert_event(conn, audit_event)
            for code, n in sorted((auth_failures or {}).items()):
                conn.execute(failures_table.insert().values(code=code, count=n))
        return written

    @staticmethod
    def _insert_keys(conn: sa.Connection, batch: list[dict[str, Any]]) -> int:
        if not batch:
            return 0
        try:
            conn.execute(keys_table.insert(), batch)
        except sa.exc.IntegrityError:
            raise InvalidRequest("the same key id appears twice") from None
        n = len(batch)
        batch.clear()
        return n

    def close(self) -> None:
        self._breaker.shut()  # from now on every call is StoreUnavailable, without connecting
        self._drop_reader()
        with self._readers_lock:
            readers, self._open_readers = self._open_readers, set()
        for conn in readers:
            try:
                conn.close()
            except Exception:
                pass
        self.engine.dispose()
        if self._readers is not self.engine:
            self._readers.dispose()
