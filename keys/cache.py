"""A per-process cache of key records with bounded staleness.

Verification against a networked store (PostgreSQL) would otherwise pay a
round trip per request. The cache answers from memory and, at most every
``max_staleness`` seconds, asks the store for its revision counter, which every
revocation and rotation bumps; a changed revision empties the cache. So a key
revoked on any instance is refused everywhere within ``max_staleness`` (plus
one request's latency). If the revision can't be read, ``StoreUnavailable``
propagates (503): a stale cache never vouches for a key past the bound.

Only found keys are cached: a key created on another instance is looked up in
the store on first use, so it works at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .model import KeyRecord
from .store.base import KeyStore


class CachedLookup:
    """``get(key_id)`` like a store's, from memory while the store's revision holds."""

    def __init__(self, store: KeyStore, max_staleness: float = 0.5, max_entries: int = 100_000) -> None:
        self.store = store
        self.max_staleness = max_staleness
        self.max_entries = max_entries
        self._records: dict[str, KeyRecord] = {}
        self._revision: int | None = None
        self._epoch = 0  # bumped on every clear, so a fetch that raced a clear isn't cached
        self._checked = -float("inf")
        self._lock = threading.Lock()
        #: Called after every revision read that succeeded: the store answered (outage tracking).
        self.on_reached: Callable[[], None] | None = None

    def get(self, key_id: str) -> KeyRecord | None:
        if time.monotonic() - self._checked > self.max_staleness:
            self._revalidate()
        record = self._records.get(key_id)
        if record is not None:
            return record
        epoch = self._epoch
        record = self.store.get(key_id)
        if record is not None:
            with self._lock:
                if epoch == self._epoch:
                    if len(self._records) >= self.max_entries:
                        # Evict the oldest entry: O(1), and a key that stays hot comes back.
                        self._records.pop(next(iter(self._records)))
                    self._records[key_id] = record
        return record

    def _revalidate(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked <= self.max_staleness:
                return  # another thread just did it
            revision = self.store.revision()  # StoreUnavailable propagates: fail closed
            if revision != self._revision:
                self._records.clear()
                self._epoch += 1
                self._revision = revision
            self._checked = now
        if self.on_reached is not None:
            self.on_reached()

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._epoch += 1
            self._checked = -float("inf")
