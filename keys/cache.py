"""A per-process cache of key records with bounded staleness.

Verification against a networked store (PostgreSQL) would otherwise pay a
round trip per request. The cache answers from memory and, at most every
``max_staleness`` seconds, asks the store for its revision counter, which every
revocation and rotation bumps; a changed revision empties the cache. So a key
revoked on any instance is refused everywhere within ``max_staleness`` (plus
one request's latency). If the revision can't be read, ``StoreUnavailable``
propagates (503): a stale cache never vouches for a key past the bound.

Unknown key ids are remembered too, until the next revision check: an attacker
repeating a forged id costs the store one lookup per check, not one per request, and
an unknown id is answered as fast as a known id with a wrong secret (no timing oracle).
Since that memory is dropped at every check, a key created on another instance (which
doesn't move the revision) works everywhere within ``max_staleness`` even if its id was
presented before it existed; a key never presented before is looked up at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .model import KeyRecord
from .store.base import KeyStore


class CachedLookup:
    """``get(key_id)`` like a store's, from memory while the store's revision holds."""

    def __init__(self, store: KeyStore, max_staleness: float = 0.5, max_entries: int = 100_000,
                 max_unknown: int = 10_000) -> None:
        self.store = store
        self.max_staleness = max_staleness
        self.max_entries = max_entries
        self.max_unknown = max_unknown  # bounds what a flood of forged ids can make it hold
        self._records: dict[str, KeyRecord] = {}
        self._unknown: dict[str, None] = {}  # ids the store didn't have at the last check
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
        if key_id in self._unknown:
            return None
        epoch = self._epoch
        record = self.store.get(key_id)
        with self._lock:
            if epoch == self._epoch:
                # Evict the oldest entry when full: O(1), and a key that stays hot comes back.
                if record is not None:
                    if len(self._records) >= self.max_entries:
                        self._records.pop(next(iter(self._records)))
                    self._records[key_id] = record
                elif self.max_unknown:  # 0: unknown ids are not remembered (bench/ compares)
                    if len(self._unknown) >= self.max_unknown:
                        self._unknown.pop(next(iter(self._unknown)))
                    self._unknown[key_id] = None
        return record

    def _revalidate(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked <= self.max_staleness:
                return  # another thread just did it
            revision = self.store.revision()  # StoreUnavailable propagates: fail closed
            # Unknown ids are asked again after every check (a key may have been created
            # meanwhile: creation doesn't move the revision); the epoch keeps a lookup that
            # began before this check from re-adding one.
            self._unknown.clear()
            self._epoch += 1
            if revision != self._revision:
                self._records.clear()
                self._revision = revision
            self._checked = now
        if self.on_reached is not None:
            self.on_reached()

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self._unknown.clear()
            self._epoch += 1
            self._checked = -float("inf")
