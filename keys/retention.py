"""Audit retention: events older than the retention period are deleted behind the request path.

A daemon thread prunes a minute after start and then every hour, in small batches (each
its own short transaction), so no request ever waits for it. Every worker runs one;
deleting what another worker already deleted costs one indexed query.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from .forking import after_fork_in_child
from .store.base import KeyStore

log = logging.getLogger("keygate.retention")


class AuditRetention:
    def __init__(self, store: KeyStore, keep_seconds: float, *, interval: float = 3600.0,
                 first_after: float = 60.0, batch: int = 1000) -> None:
        self.store = store
        self.keep_seconds = keep_seconds
        self.interval = interval
        self.first_after = first_after
        self.batch = batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        after_fork_in_child(self._after_fork)

    def prune(self, now: float | None = None) -> int:
        """Delete every event older than the retention period; how many went."""
        cutoff = (time.time() if now is None else now) - self.keep_seconds
        total = 0
        while True:
            deleted = self.store.prune_events(cutoff, self.batch)
            total += deleted
            if deleted < self.batch or self._stop.is_set():
                return total

    def start(self) -> None:
        if self._thread is None:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_prune_periodically, args=(weakref.ref(self), self._stop),
                                            name="keygate-retention", daemon=True)
            self._thread.start()

    def prune_and_log(self) -> None:
        try:
            deleted = self.prune()
        except Exception:  # the store is down: the next round catches up
            log.warning("could not prune the audit trail; will retry", exc_info=True)
            return
        if deleted:
            log.info("pruned %d audit events older than %d days", deleted, self.keep_seconds // 86400)

    def _after_fork(self) -> None:
        self._thread = None  # a forked child has no thread; its app starts one if it serves

    def close(self) -> None:
        self._stop.set()
        self._thread = None


def _prune_periodically(ref: weakref.ref[AuditRetention], stop: threading.Event) -> None:
    """The thread holds its ``AuditRetention`` (and so the store) only while pruning: one
    that nothing else uses any more is collected, and the thread ends."""
    retention = ref()
    wait = 0.0 if retention is None else retention.first_after
    del retention
    while not stop.wait(wait):
        retention = ref()
        if retention is None:
            return
        wait = retention.interval
        retention.prune_and_log()
        del retention
