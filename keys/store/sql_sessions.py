"""Console sessions in SQL: one row per signed-in browser, keyed by the hash of its id."""

from __future__ import annotations

import sqlalchemy as sa

from ..model import SessionRecord
from .schema import sessions_table
from .sql_access import SqlAccess


class SqlSessions(SqlAccess):
    def add_session(self, session: SessionRecord) -> None:
        with self._write() as conn:
            conn.execute(sessions_table.insert().values(**session._asdict()))

    def get_session(self, id_hash: str) -> SessionRecord | None:
        s = sessions_table.c
        with self._read() as conn:
            row = conn.execute(sa.select(s.id_hash, s.key_id, s.created_at, s.last_seen_at, s.csrf_secret)
                               .where(s.id_hash == id_hash)).first()
        return None if row is None else SessionRecord(*row)

    def touch_session(self, id_hash: str, at: float) -> None:
        s = sessions_table.c
        with self._write() as conn:
            conn.execute(sessions_table.update().where(s.id_hash == id_hash, s.last_seen_at < at)
                         .values(last_seen_at=at))

    def delete_session(self, id_hash: str) -> None:
        with self._write() as conn:
            conn.execute(sessions_table.delete().where(sessions_table.c.id_hash == id_hash))

    def purge_sessions(self, idle_before: float, created_before: float) -> int:
        s = sessions_table.c
        with self._write() as conn:
            return int(conn.execute(sessions_table.delete().where(
                sa.or_(s.last_seen_at < idle_before, s.created_at < created_before))).rowcount)
