"""A process-local store: for tests and for trying keygate without a database."""

from __future__ import annotations

import bisect
import threading

from ..model import KeyRecord
from .base import SCHEMA_VERSION, KeyStore


class MemoryKeyStore(KeyStore):
    backend = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._ids: list[str] = []  # sorted, for paging
        self._lock = threading.Lock()

    def migrate(self) -> int:
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def add(self, record: KeyRecord) -> None:
        with self._lock:
            if record.id in self._keys:
                raise ValueError(f"key id {record.id} already exists")
            self._keys[record.id] = record
            bisect.insort(self._ids, record.id)

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def list(self, *, limit: int | None = None, after: str | None = None) -> list[KeyRecord]:
        with self._lock:
            start = bisect.bisect_right(self._ids, after) if after is not None else 0
            stop = None if limit is None else start + limit
            return [self._keys[i] for i in self._ids[start:stop]]

    def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        with self._lock:
            record = self._keys.get(key_id)
            if record is None:
                return None
            if record.revoked_at is None or record.revoked_at > at:
                record = record.replace(revoked_at=at, generation=record.generation + 1)
                self._keys[key_id] = record
            return record

    def count(self) -> int:
        return len(self._keys)
