"""Tables and the versioned migrations that build them.

Each migration runs once, in order, inside one transaction that also records
the new version, so a killed ``init`` leaves the store at the old version or
the new one, never between. Add a migration by appending to ``MIGRATIONS``
and raising ``SCHEMA_VERSION``; never edit one that has shipped.

Each migration spells out its own DDL, frozen as it shipped (``_frozen`` tables on
a throwaway ``MetaData``), never the live definitions below: a migration that
created a table from its live definition would, on a fresh install, already
create the column a later migration adds with ``ALTER``, and that one would fail.
The live definitions are what queries use; a test checks that running every
migration on an empty store builds exactly them.
"""

from __future__ import annotations

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
    sa.Column("last_used_at", sa.Double),
    sa.Column("use_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("rate_limit", sa.String(40)),
    sa.Column("allowed_ips", sa.Text, nullable=False, server_default=""),  # space-separated
    sa.Column("replaces", sa.String(16)),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
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


def _frozen(name: str, *columns: sa.Column[Any] | sa.Index) -> sa.Table:
    """A table as one migration created it, independent of the live definitions."""
    return sa.Table(name, sa.MetaData(), *columns)


def _v1(conn: sa.Connection) -> None:
    _frozen(
        "api_keys",
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
    ).create(conn)


def _v2(conn: sa.Connection) -> None:
    _frozen(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False, index=True),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    ).create(conn)
    _frozen(
        "auth_failures",
        sa.Column("code", sa.String(40), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False, server_default="0"),
    ).create(conn)


def _v3(conn: sa.Connection) -> None:
    revision = _frozen(
        "keygate_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    revision.create(conn)
    conn.execute(revision.insert().values(id=1, revision=0))


def _v4(conn: sa.Connection) -> None:
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


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "api_keys table", _v1),
    (2, "audit_events and auth_failures tables", _v2),
    (3, "keygate_revision counter for verification caches", _v3),
    (4, "usage_hourly counts and console_sessions", _v4),
]
