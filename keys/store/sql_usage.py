"""Hourly usage counts in SQL: added to by every worker's flusher, read by the charts."""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..model import UsageBucket
from .schema import usage_table
from .sql_access import SqlAccess

_COUNTS = ("accepted", "refused_limit", "refused_scope")


def add_hourly(conn: sa.Connection, hourly: Mapping[tuple[str, int], tuple[int, int, int]]) -> None:
    """Add each bucket's counts to its row, creating it if needed: one ``INSERT … ON CONFLICT``
    (SQLite and PostgreSQL both have it), so two workers flushing the same hour both count."""
    if not hourly:
        return
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(usage_table)
    stmt = stmt.on_conflict_do_update(
        index_elements=[usage_table.c.key_id, usage_table.c.hour],
        set_={name: usage_table.c[name] + stmt.excluded[name] for name in _COUNTS},
    )
    rows = [{"key_id": key_id, "hour": hour, **dict(zip(_COUNTS, counts))}
            for (key_id, hour), counts in sorted(hourly.items())]
    conn.execute(stmt, rows)


class SqlUsage(SqlAccess):
    def usage(self, key_id: str, since: float, until: float) -> list[UsageBucket]:
        u = usage_table.c
        stmt = (sa.select(u.hour, u.accepted, u.refused_limit, u.refused_scope)
                .where(u.key_id == key_id, u.hour >= since, u.hour < until).order_by(u.hour))
        with self._read() as conn:
            return [UsageBucket(float(hour), int(a), int(limit), int(scope))
                    for hour, a, limit, scope in conn.execute(stmt)]

    def purge_usage(self, before: float) -> int:
        with self._write() as conn:
            return int(conn.execute(usage_table.delete().where(usage_table.c.hour < before)).rowcount)
