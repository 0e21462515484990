"""What the SQL store's parts share: a read and a write transaction on its engine."""

from __future__ import annotations

from contextlib import AbstractContextManager

import sqlalchemy as sa


class SqlAccess:
    """Declares the transactions ``SqlKeyStore`` opens, for the mixins that add tables to it."""

    engine: sa.Engine

    def _write(self) -> AbstractContextManager[sa.Connection]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[sa.Connection]:
        raise NotImplementedError
