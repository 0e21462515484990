"""Usage in SQL: each key's totals and hourly counts, added to by every worker's flusher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from ..model import UsageBucket
from .schema import usage_table, usage_totals_table
from .sql_access import SqlAccess

_COUNTS = ("accepted", "refused_limit", "refused_scope")


class DriverStatement:
    """A statement SQLAlchemy compiled once, run with the driver's ``executemany``: Core's
    ``execute(stmt, rows)`` handled each row's parameters in Python, ~20 µs a row here, most
    of a flush of thousands of keys (bench/README.md)."""

    def __init__(self, stmt: sa.ClauseElement, dialect: sa.Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self._order = list(compiled.positiontup or ()) if compiled.positional else None

    def run_many(self, conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        params: Any = rows if self._order is None else [tuple(r[n] for n in self._order) for r in rows]
        conn.exec_driver_sql(self.sql, params)


def _upserts(dialect: sa.Dialect) -> tuple[sa.ClauseElement, sa.ClauseElement]:
    """``INSERT … ON CONFLICT`` (SQLite and PostgreSQL both have it) adding a flush's counts to
    what is there, so two workers flushing the same key and hour both count."""
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    t = usage_totals_table.c
    totals = insert(usage_totals_table).values(
        key_id=sa.bindparam("key_id"), use_count=sa.bindparam("use_count"),
        last_used_at=sa.bindparam("last_used_at"))
    totals = totals.on_conflict_do_update(index_elements=[t.key_id], set_={
        "use_count": t.use_count + totals.excluded.use_count,
        "last_used_at": sa.case((t.last_used_at.is_(None), totals.excluded.last_used_at),
                                (t.last_used_at < totals.excluded.last_used_at, totals.excluded.last_used_at),
                                else_=t.last_used_at),
    })
    hourly = insert(usage_table).values({name: sa.bindparam(name) for name in ("key_id", "hour", *_COUNTS)})
    hourly = hourly.on_conflict_do_update(
        index_elements=[usage_table.c.key_id, usage_table.c.hour],
        set_={name: usage_table.c[name] + hourly.excluded[name] for name in _COUNTS},
    )
    return totals, hourly


class SqlUsage(SqlAccess):
    @cached_property
    def _usage_writes(self) -> tuple[DriverStatement, DriverStatement]:
        dialect = self.engine.dialect
        return tuple(DriverStatement(stmt, dialect) for stmt in _upserts(dialect))  # type: ignore[return-value]

    def record_usage(self, usage: Mapping[str, tuple[float, int]],
                     hourly: Mapping[tuple[str, int], tuple[int, int, int]] | None = None) -> None:
        if not usage and not hourly:
            return
        totals, hours = self._usage_writes
        # Sorted: two workers' flushes take row locks (PostgreSQL) in the same order.
        total_rows = [{"key_id": key_id, "use_count": n, "last_used_at": at}
                      for key_id, (at, n) in sorted(usage.items())]
        hour_rows = [{"key_id": key_id, "hour": hour, **dict(zip(_COUNTS, counts))}
                     for (key_id, hour), counts in sorted((hourly or {}).items())]
        with self._write() as conn:
            totals.run_many(conn, total_rows)
            hours.run_many(conn, hour_rows)

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
