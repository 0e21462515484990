"""Tables and the versioned migrations that build them.

Each migration runs once, in order, inside one transaction that also records
the new version, so a killed ``init`` leaves the store at the old version or
the new one, never between. Add a migration by appending to ``MIGRATIONS``
and raising ``SCHEMA_VERSION``; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _v1(conn: sa.Connection) -> None:
    keys_table.create(conn)


def _v2(conn: sa.Connection) -> None:
    audit_table.create(conn)
    failures_table.create(conn)


def _v3(conn: sa.Connection) -> None:
    revision_table.create(conn)
    conn.execute(revision_table.insert().values(id=1, revision=0))


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "api_keys table", _v1),
    (2, "audit_events and auth_failures tables", _v2),
    (3, "keygate_revision counter for verification caches", _v3),
]
