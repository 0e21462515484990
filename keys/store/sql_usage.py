"""Usage in SQL: each key's totals and hourly counts, added to by every worker's flusher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.compiler import SQLCompiler

from ..model import UsageBucket
from .schema import usage_table, usage_totals_table
from .sql_access import SqlAccess

_COUNTS = ("accepted", "refused_limit", "refused_scope")


class DriverStatement:
    """A statement SQLAlchemy compiled once, run with the driver's ``executemany`` on rows of
    values in the order of ``names``: Core's ``execute(stmt, rows)`` handled each row's
    parameters in Python, ~20 µs a row here, most of a flush of thousands of keys
    (bench/README.md)."""

    def __init__(self, stmt: sa.ClauseElement, dialect: sa.Dialect, names: Sequence[str]) -> None:
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect))  # a DML statement's is
        self.sql = str(compiled)
        self._names = tuple(names)
        self._positional = bool(compiled.positional)
        if self._positional and tuple(compiled.positiontup or ()) != self._names:
            raise ValueError(f"the statement takes {compiled.positiontup}, not {self._names}")

    def run_many(self, conn: sa.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        params = rows if self._positional else [dict(zip(self._names, row)) for row in rows]
        conn.exec_driver_sql(self.sql, params)


_TOTALS = ("key_id", "use_count", "last_used_at")
_HOURLY = ("key_id", "hour", *_COUNTS)


def _upserts(dialect: sa.Dialect) -> tuple[sa.ClauseElement, sa.ClauseElement]:
    """``INSERT … ON CONFLICT`` (SQLite and PostgreSQL both have it) adding a flush's counts to
    what is there, so two workers flushing the same key and hour both count."""
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    t = usage_totals_table.c
    totals = insert(usage_totals_table).values({name: sa.bindparam(name) for name in _TOTALS})
    totals = totals.on_conflict_do_update(index_elements=[t.key_id], set_={
        "use_count": t.use_count + totals.excluded.use_count,
        "last_used_at": sa.case((t.last_used_at.is_(None), totals.excluded.last_used_at),
                                (t.last_used_at < totals.excluded.last_used_at, totals.excluded.last_used_at),
                                else_=t.last_used_at),
    })
    hourly = insert(usage_table).values({name: sa.bindparam(name) for name in _HOURLY})
    hourly = hourly.on_conflict_do_update(
        index_elements=[usage_table.c.key_id, usage_table.c.hour],
        set_={name: usage_table.c[name] + hourly.excluded[name] for name in _COUNTS},
    )
    return totals, hourly


class SqlUsage(SqlAccess):
    @cached_property
    def _usage_writes(self) -> tuple[DriverStatement, DriverStatement]:
        dialect = self.engine.dialect
        totals, hourly = _upserts(dialect)
        return DriverStatement(totals, dialect, _TOTALS), DriverStatement(hourly, dialect, _HOURLY)

    def record_usage(self, usage: Mapping[str, tuple[float, int]],
                     hourly: Mapping[tuple[str, int], tuple[int, int, int]] | None = None) -> None:
        if not usage and not hourly:
            return
        totals, hours = self._usage_writes
        # Sorted: two workers' flushes take row locks (PostgreSQL) in the same order.
        total_rows = [(key_id, n, at) for key_id, (at, n) in sorted(usage.items())]
        hour_rows = [(key_id, hour, *counts) for (key_id, hour), counts in sorted((hourly or {}).items())]
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
