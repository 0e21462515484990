"""Tables and the versioned migrations that build them.

Each migration runs once, in order, inside one transaction that also records
the new version, so a killed ``init`` leaves the store at the old version or
the new one, never between. Add a migration by appending to ``MIGRATIONS``
and raising ``SCHEMA_VERSION``; never edit one that has shipped. A migration builds
what it creates from its own frozen definitions (``_frozen_*``), never from the live
tables above, which later migrations change: a fresh install runs every migration in
turn and must end where an upgraded store does.
A test checks that running every migration on an empty store builds exactly the live
tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()

schema_table = sa.Table(
    "keygate_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.Double, nullable=False),
)

keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("scopes", sa.Text, nullable=False),  # space-separated
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double),
    sa.Column("revoked_at", sa.Double),
    # Usage before schema 6 (or carried over by an import); what was counted since is in
    # key_usage, and a key's record is the sum (the latest last use) of both.
    sa.Column("last_used_at", sa.Double),
    sa.Column("use_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rate_limit", sa.String(40)),
    sa.Column("allowed_ips", sa.Text, nullable=False, server_default=""),  # a JSON array (v4)
    sa.Column("replaces", sa.String(16)),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
)

# v6: each key's request count and last use as the usage flushes count them, apart from the
# keys. A flush writes one row per key used; in this narrow table those rows share a few
# pages, where in ``api_keys`` each was a page of its own (a flush of 10,000 keys in a
# 1,000,000-key store rewrote 10,000 pages). A key never used has no row. (SQLite: the
# primary key is the table, no rowid.)
usage_totals_table = sa.Table(
    "key_usage",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("use_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_used_at", sa.Double),
    sqlite_with_rowid=False,
)


audit_table = sa.Table(
    "audit_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(16), nullable=False, index=True),
    sa.Column("actor", sa.String(120), nullable=False),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),  # JSON, never a secret
    # v4: frequent events (token mints) are kept as one summary row per key, actor and period
    # (``at // period length``); NULL for every other event.
    sa.Column("period", sa.BigInteger),
    sa.Index("ix_audit_events_at", "at"),
    sa.Index("ux_audit_events_summary", "key_id", "event", "actor", "period", unique=True),
)

failures_table = sa.Table(
    "auth_failures",
    metadata,
    sa.Column("code", sa.String(40), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
)


revision_table = sa.Table(
    "keygate_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

usage_table = sa.Table(
    "usage_hourly",
    metadata,
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("hour", sa.BigInteger, primary_key=True),  # epoch seconds of the hour's start, UTC
    sa.Column("accepted", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refused_limit", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refused_scope", sa.BigInteger, nullable=False, server_default="0"),
    sa.Index("ix_usage_hourly_hour", "hour"),  # retention deletes by age
)

sessions_table = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),  # SHA-256 of the browser's session id
    sa.Column("key_id", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("last_seen_at", sa.Double, nullable=False),
    sa.Column("csrf_secret", sa.String(64), nullable=False),
)


def _frozen(name: str, *columns: sa.Column[Any] | sa.Index, **options: Any) -> sa.Table:
    """A table as one migration created it, independent of the live definitions."""
    return sa.Table(name, sa.MetaData(), *columns, **options)


# -- the tables as each migration created them (frozen: never edit) ------------------


def _frozen_v1(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "api_keys",
        metadata,
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.Column("revoked_at", sa.Double),
        sa.Column("last_used_at", sa.Double),
        sa.Column("use_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("rate_limit", sa.String(40)),
        sa.Column("allowed_ips", sa.Text, nullable=False, server_default=""),
        sa.Column("replaces", sa.String(16)),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    )


def _frozen_v2(metadata: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    audit = sa.Table(
        "audit_events",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False, index=True),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    )
    failures = sa.Table(
        "auth_failures",
        metadata,
        sa.Column("code", sa.String(40), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
    )
    return audit, failures


def _frozen_v3(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "keygate_revision",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )


def _v1(conn: sa.Connection) -> None:
    _frozen_v1(sa.MetaData()).create(conn)


def _v2(conn: sa.Connection) -> None:
    for table in _frozen_v2(sa.MetaData()):
        table.create(conn)


def _v3(conn: sa.Connection) -> None:
    revision = _frozen_v3(sa.MetaData())
    revision.create(conn)
    conn.execute(revision.insert().values(id=1, revision=0))


def _v4(conn: sa.Connection) -> None:
    """Token mints summarised per key and period; audit retention by time; allow-lists as
    JSON arrays (space-separated text could be split differently from how it was checked)."""
    conn.execute(sa.text("ALTER TABLE audit_events ADD COLUMN period BIGINT"))
    for index in audit_table.indexes:
        if index.name in ("ix_audit_events_at", "ux_audit_events_summary"):
            index.create(conn)
    frozen_keys = _frozen_v1(sa.MetaData())
    k = frozen_keys.c
    rows = conn.execute(sa.select(k.id, k.allowed_ips).where(k.allowed_ips != "")).all()
    for key_id, text in rows:
        if not text.startswith("["):
            conn.execute(frozen_keys.update().where(k.id == key_id)
                         .values(allowed_ips=json.dumps(list(legacy_networks(text)))))


#: Stands in for an allow-list that can't be read: it matches no address (fail closed).
UNREADABLE_NETWORK = "unreadable"


def dump_networks(networks: tuple[str, ...]) -> str:
    """An allow-list as stored: a JSON array (``""`` for none, anywhere)."""
    return json.dumps(list(networks)) if networks else ""


def load_networks(text: str) -> tuple[str, ...]:
    """A stored allow-list; one that can't be read is ``(UNREADABLE_NETWORK,)``."""
    if not text:
        return ()
    if not text.startswith("["):
        return legacy_networks(text)
    try:
        networks = json.loads(text)
    except ValueError:
        return (UNREADABLE_NETWORK,)
    if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
        return (UNREADABLE_NETWORK,)
    return tuple(networks)


def legacy_networks(text: str) -> tuple[str, ...]:
    """A space-separated allow-list (schema 1-3). One with an IPv6 zone id (``%``) can't be
    split back into what was checked (``"::%x 0.0.0.0/0"`` was one entry, and would read as
    two, the second "anywhere"): it admits nobody until an admin sets it again."""
    if "%" in text:
        return (UNREADABLE_NETWORK,)
    return tuple(text.split())


def _v5(conn: sa.Connection) -> None:
    _frozen(
        "usage_hourly",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("accepted", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refused_limit", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refused_scope", sa.BigInteger, nullable=False, server_default="0"),
        sa.Index("ix_usage_hourly_hour", "hour"),
    ).create(conn)
    _frozen(
        "console_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("last_seen_at", sa.Double, nullable=False),
        sa.Column("csrf_secret", sa.String(64), nullable=False),
    ).create(conn)


def _v6(conn: sa.Connection) -> None:
    """Usage totals counted apart from the keys (see ``usage_totals_table``). Nothing moves
    and nothing is dropped: an instance of the previous release, still running during a
    rolling upgrade, keeps adding to the columns of ``api_keys``, which still count."""
    _frozen(
        "key_usage",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("use_count", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_used_at", sa.Double),
        sqlite_with_rowid=False,
    ).create(conn)


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "api_keys table", _v1),
    (2, "audit_events and auth_failures tables", _v2),
    (3, "keygate_revision counter for verification caches", _v3),
    (4, "audit summaries and retention index; allow-lists as JSON", _v4),
    (5, "usage_hourly counts and console_sessions", _v5),
    (6, "key_usage: usage totals apart from the keys", _v6),
]
