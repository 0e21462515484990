"""Usage and failure counters, written behind the request path.

A request only touches a dict under an uncontended lock (well under a
microsecond); a daemon thread flushes the batch to the store every
``interval`` seconds, and ``flush()`` runs once more on clean shutdown. A crash
loses at most one interval's counts, never a key or an audit event.

Besides each key's ``use_count`` and ``last_used_at``, a flush adds per-key counts
by hour (accepted, refused by the key's rate limit, refused for a scope it lacks)
in the same transaction, and at most once an hour forgets hours older than
``retention``.
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

HOUR = 3600
_ACCEPTED, _LIMITED, _SCOPE = 0, 1, 2
#: Seconds between two purges of old hourly counts by one process.
PURGE_EVERY = 3600


class UsageRecorder:
    def __init__(self, store: KeyStore, interval: float = 5.0, retention: float | None = None) -> None:
        self.store = store
        self.interval = interval
        #: Seconds hourly counts are kept; ``None`` keeps them forever.
        self.retention = retention
        # key_id -> [last_used_at, count, hour start, hour end, accepted in that hour]: a request
        # that stays in its key's hour costs one more increment, not a second dict.
        self._usage: dict[str, list[float]] = {}
        self._hourly: dict[tuple[str, int], list[int]] = {}  # (key_id, hour start) -> counts
        self._failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        # Held for a whole flush: the last one (``close``) waits for one the flusher thread has
        # under way, whose counts would die with the process if that ended it mid-write.
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None  # the flusher, started by the first count
        self._stop = threading.Event()  # one per flusher thread
        self._atexit_registered = False
        self._purged_at = -float("inf")
        self.flushes = 0  # store writes made, for tests and metrics
        #: Called after every flush that wrote something: ``(seconds it took, the error or None)``.
        self.on_flush: Callable[[float, BaseException | None], None] | None = None
        after_fork_in_child(self._after_fork)

    def hit(self, key_id: str, now: float | None = None) -> None:
        """One accepted request of ``key_id``."""
        now = time.time() if now is None else now
        with self._lock:
            entry = self._usage.get(key_id)
            if entry is None:
                start = now // HOUR * HOUR
                self._usage[key_id] = [now, 1, start, start + HOUR, 1]
            else:
                entry[0] = now
                entry[1] += 1
                if entry[2] <= now < entry[3]:  # two comparisons: cheaper than working out the hour
                    entry[4] += 1
                else:
                    self._roll(key_id, entry, now)
        if self._thread is None:
            self._start_thread()

    def _roll(self, key_id: str, entry: list[float], now: float) -> None:
        """Move an entry's count for its hour into ``_hourly``; it counts ``now``'s hour from now on."""
        if entry[4]:
            self._hourly.setdefault((key_id, int(entry[2])), [0, 0, 0])[_ACCEPTED] += int(entry[4])
        start = now // HOUR * HOUR
        entry[2], entry[3], entry[4] = start, start + HOUR, 1

    def limited(self, key_id: str, now: float | None = None) -> None:
        """A request of ``key_id`` refused by its rate limit."""
        self._refused(key_id, _LIMITED, now)

    def failure(self, code: str, key_id: str | None = None, now: float | None = None) -> None:
        """A refused request, counted per outcome code; ``key_id`` when a verified key was
        refused for a scope it lacks (counted in that key's hour too)."""
        with self._lock:
            self._failures[code] += 1
        if key_id is not None:
            self._refused(key_id, _SCOPE, now)
        elif self._thread is None:
            self._start_thread()

    def _refused(self, key_id: str, which: int, now: float | None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._hourly.setdefault((key_id, int(now // HOUR) * HOUR), [0, 0, 0])[which] += 1
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
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            usage, self._usage = self._usage, {}
            hourly, self._hourly = self._hourly, {}
            failures, self._failures = self._failures, Counter()
        for key_id, entry in usage.items():
            if entry[4]:
                hourly.setdefault((key_id, int(entry[2])), [0, 0, 0])[_ACCEPTED] += int(entry[4])
        if not usage and not hourly and not failures:
            self._purge()
            return
        started = time.perf_counter()
        try:
            if usage or hourly:
                self.store.record_usage({k: (v[0], int(v[1])) for k, v in usage.items() if v[1]},
                                        {bucket: (c[0], c[1], c[2]) for bucket, c in hourly.items()})
                self.flushes += 1
                usage, hourly = {}, {}  # written: a failure below must not merge them back (twice)
            if failures:
                self.store.add_auth_failures(failures)
                self.flushes += 1
        except Exception as e:
            if self.on_flush is not None:  # it reports the outage (once, not every interval)
                self.on_flush(time.perf_counter() - started, e)
            else:
                log.warning("could not write usage counters; will retry", exc_info=True)
            with self._lock:  # merge back so nothing is lost to a brief outage
                for k, entry in usage.items():
                    # Its hour's count now sits in ``hourly``: the entry keeps the rest.
                    mine = self._usage.setdefault(k, [entry[0], 0, 0.0, 0.0, 0])
                    mine[0] = max(mine[0], entry[0])
                    mine[1] += entry[1]
                for bucket, counts in hourly.items():
                    row = self._hourly.setdefault(bucket, [0, 0, 0])
                    for i, n in enumerate(counts):
                        row[i] += n
                self._failures.update(failures)
            return
        if self.on_flush is not None:
            self.on_flush(time.perf_counter() - started, None)
        self._purge()

    def _purge(self) -> None:
        if self.retention is None or time.monotonic() - self._purged_at < PURGE_EVERY:
            return
        self._purged_at = time.monotonic()
        try:
            self.store.purge_usage(time.time() - self.retention)
        except Exception:
            log.warning("could not forget old hourly usage; will retry", exc_info=True)
            self._purged_at = -float("inf")

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
        self._flushing = threading.Lock()
        self._thread = None
        self._usage, self._hourly, self._failures = {}, {}, Counter()

    def close(self) -> None:
        """Stop the flusher and write what is left (clean shutdown). A later count starts
        a new flusher."""
        with self._lock:
            self._stop.set()
            self._thread = None
        self.flush()
