"""Usage and failure counters, written behind the request path.

A request only touches a dict under an uncontended lock (well under a
microsecond); a daemon thread flushes the batch to the store every
``interval`` seconds, and ``flush()`` runs once more on clean shutdown. A crash
loses at most one interval's counts, never a key or an audit event.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from .forking import after_fork_in_child
from .store.base import KeyStore

log = logging.getLogger("keygate.usage")


class UsageRecorder:
    def __init__(self, store: KeyStore, interval: float = 5.0) -> None:
        self.store = store
        self.interval = interval
        self._usage: dict[str, list[float]] = {}  # key_id -> [last_used_at, count]
        self._failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # the flusher, started by the first count
        self._stop = threading.Event()  # one per flusher thread
        self._atexit_registered = False
        self.flushes = 0  # store writes made, for tests and metrics
        #: Called after every flush that wrote something: ``(seconds it took, the error or None)``.
        self.on_flush: Callable[[float, BaseException | None], None] | None = None
        after_fork_in_child(self._after_fork)

    def hit(self, key_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            entry = self._usage.get(key_id)
            if entry is None:
                self._usage[key_id] = [now, 1]
            else:
                entry[0] = now
                entry[1] += 1
        if self._thread is None:
            self._start_thread()

    def failure(self, code: str) -> None:
        with self._lock:
            self._failures[code] += 1
        if self._thread is None:
            self._start_thread()

    def pending_usage(self) -> dict[str, int]:
        """Request counts per key id not yet written."""
        with self._lock:
            return {key_id: int(entry[1]) for key_id, entry in self._usage.items()}

    def pending_failures(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failures)

    def flush(self) -> None:
        """Write what has accumulated; on failure keep it for the next try."""
        with self._lock:
            usage, self._usage = self._usage, {}
            failures, self._failures = self._failures, Counter()
        if not usage and not failures:
            return
        started = time.perf_counter()
        try:
            if usage:
                self.store.record_usage({k: (v[0], int(v[1])) for k, v in usage.items()})
                self.flushes += 1
                usage = {}  # written: a failure below must not merge it back (and count it twice)
            if failures:
                self.store.add_auth_failures(failures)
                self.flushes += 1
        except Exception as e:
            if self.on_flush is not None:  # it reports the outage (once, not every interval)
                self.on_flush(time.perf_counter() - started, e)
            else:
                log.warning("could not write usage counters; will retry", exc_info=True)
            with self._lock:  # merge back so nothing is lost to a brief outage
                for k, (at, n) in usage.items():
                    entry = self._usage.setdefault(k, [at, 0])
                    entry[0] = max(entry[0], at)
                    entry[1] += n
                self._failures.update(failures)
            return
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - started, None)

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return  # another thread just did it
            self._stop = stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(stop,), name="keygate-usage", daemon=True)
            self._thread.start()
            if not self._atexit_registered:
                atexit.register(self.close)
                self._atexit_registered = True

    def _run(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.interval):
                self.flush()
        finally:  # however it ended, the next count starts a new flusher
            with self._lock:
                if self._stop is stop:
                    self._thread = None

    def _after_fork(self) -> None:
        # A forked child has no flusher thread, a lock possibly held by one, and the
        # parent's pending counts (the parent writes those): start clean.
        self._lock = threading.Lock()
        self._thread = None
        self._usage, self._failures = {}, Counter()

    def close(self) -> None:
        """Stop the flusher and write what is left (clean shutdown). A later count starts
        a new flusher."""
        with self._lock:
            self._stop.set()
            self._thread = None
        self.flush()
