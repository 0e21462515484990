"""Prometheus metrics, summed over every worker process of the server.

Each process writes its values into files of prometheus-client's multiprocess format
(``counter_<id>.db``, ``histogram_<id>.db``, ``gauge_livemostrecent_<id>.db``) in one
directory, ``<instance path>/metrics``; a scrape, in whichever worker answers it, reads
them all with the library's ``MultiProcessCollector`` and adds what only the store can
say (keys per state, read at most every 30 s). ``serve`` empties the directory before
its workers start, so the totals start at zero with the server; a worker that dies
leaves its counts in, so totals never go backwards.

Values are written here rather than through prometheus-client's ``Counter`` and
``Histogram``: those take a lock and a pid check per value (1.6 µs each on the test VM,
three per request). A request only appends to a queue in memory; the counts go to the files
every second (and before a scrape, and at exit), so a scrape sees another worker's last
second late, and a worker that crashes loses at most its last second of counts.

No label ever holds a key, a token, a client-supplied id or a client address: routes
are templates, methods and statuses come from fixed sets, codes from ``keys.exc``.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from keys.files import private_dir, private_file
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from keys.exc import StoreUnavailable
from keys.store.base import KeyStore

DIRECTORY_NAME = "metrics"
#: Seconds; a request or a flush slower than the last bound counts in +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
#: HTTP methods counted by name; any other (a client may send anything) is "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route of a request no rule matched (404, 405)
KEYS_REFRESH = 30.0  # seconds between two reads of the store's key counts
EXPIRING_WITHIN = ("7d", 7 * 86400)
#: Seconds between two writes of a process's request counts to its files: a scrape shows
#: another worker's requests at most this late (its own, at once).
FLUSH_INTERVAL = 1.0
#: The text exposition format every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (type, help, label names); counters are named without "_total", as prometheus-client does.
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "keygate_requests": ("counter", "Requests answered, by route template, method and status.",
                         ("route", "method", "status")),
    "keygate_request_duration_seconds": ("histogram", "Time to answer a request, by route template.",
                                         ("route",)),
    "keygate_auth_refusals": ("counter", "Requests refused for their credentials, by problem code.", ("code",)),
    "keygate_rate_limited": ("counter", "Requests refused with 429, by kind (key, auth_throttled).", ("kind",)),
    "keygate_backend_errors": ("counter", "Failed calls to a backing service (store, rate_limiter).",
                               ("backend",)),
    "keygate_backend_up": ("gauge", "1 while the backing service answers, 0 during an outage "
                           "(the latest any worker saw).", ("backend",)),
    "keygate_usage_flush_seconds": ("histogram", "Time to write a batch of usage counters to the store.", ()),
}
_FILE_OF_TYPE = {"counter": "counter", "histogram": "histogram", "gauge": "gauge_livemostrecent"}
_instances = itertools.count()  # a second app in one process writes files of its own


class Metrics:
    """One process's metric values, in the shared directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        private_dir(self.directory.parent)  # the instance directory, if this comes first
        private_dir(self.directory)
        self._bounds = DURATION_BUCKETS[:-1]  # bisect over the finite bounds; past them, +Inf
        self._open()
        ref = weakref.ref(self)
        # A process forked from this one (gunicorn --preload) writes files of its own.
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m._open())

    def _open(self) -> None:
        n = next(_instances)
        ident = f"{os.getpid()}" + (f"-{n}" if n else "")
        self._files = {kind: _private_mmap(self.directory / f"{prefix}_{ident}.db")
                       for kind, prefix in _FILE_OF_TYPE.items()}
        self._lock = threading.Lock()
        # Held for a whole flush: ``close`` waits for one the flusher thread has under way,
        # which would otherwise find the files closed and drop the requests it had taken.
        self._flushing = threading.Lock()
        self._cells: dict[tuple[str, str, tuple[str, ...]], list[Any]] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], tuple[list[Any], list[list[Any]]]] = {}
        self._requests: dict[tuple[str, str, int], tuple[list[Any], list[Any], list[list[Any]]]] = {}
        self._queue: collections.deque[tuple[str, str, int, float]] = collections.deque()
        self._stopped = threading.Event()
        threading.Thread(target=_flush_every, args=(weakref.ref(self), self._stopped, FLUSH_INTERVAL),
                         name="keygate-metrics", daemon=True).start()

    # -- cells: [file, key, value], created once per label set --------------------------

    def _cell(self, sample: str, metric: str, labels: tuple[str, ...], extra: tuple[tuple[str, str], ...] = ()) -> list[Any]:
        kind, help_text, names = DEFINITIONS[metric]
        cache_key = (sample, metric, labels + tuple(v for _, v in extra))
        cell = self._cells.get(cache_key)
        if cell is None:
            file = self._files[kind]
            key = mmap_key(metric, sample, [*names, *(n for n, _ in extra)],
                           [*labels, *(v for _, v in extra)], help_text)
            with self._lock:
                cell = self._cells.get(cache_key)
                if cell is None:
                    cell = self._cells[cache_key] = [file, key, file.read_value(key)[0]]
        return cell

    def _histogram(self, metric: str, labels: tuple[str, ...]) -> tuple[list[Any], list[list[Any]]]:
        cells = self._histograms.get((metric, labels))
        if cells is None:
            total = self._cell(metric + "_sum", metric, labels)
            buckets = [self._cell(metric + "_bucket", metric, labels, (("le", floatToGoString(b)),))
                       for b in DURATION_BUCKETS]
            cells = self._histograms[(metric, labels)] = (total, buckets)
        return cells

    # -- writing ------------------------------------------------------------------------

    def inc(self, metric: str, *labels: str, amount: float = 1.0) -> None:
        if self._stopped.is_set():
            return  # closed (a worker exiting): nothing reads this process's files any more
        cell = self._cell(metric + "_total", metric, labels)
        with self._lock:
            cell[2] += amount
            cell[0].write_value(cell[1], cell[2], 0.0)

    def observe(self, metric: str, seconds: float, *labels: str) -> None:
        if self._stopped.is_set():
            return  # closed: the last usage flush at exit comes after the metrics' own
        total, buckets = self._histogram(metric, labels)
        bucket = buckets[bisect.bisect_left(self._bounds, seconds)]
        with self._lock:
            total[2] += seconds
            total[0].write_value(total[1], total[2], 0.0)
            bucket[2] += 1.0
            bucket[0].write_value(bucket[1], bucket[2], 0.0)

    def set_gauge(self, metric: str, value: float, *labels: str) -> None:
        if self._stopped.is_set():
            return
        cell = self._cell(metric, metric, labels)
        with self._lock:
            cell[2] = value
            cell[0].write_value(cell[1], value, time.time())  # "mostrecent": the newest wins

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """The hot path: one request, queued in this process's memory (``deque.append`` is
        atomic, so no lock); ``flush`` adds the queue up into the shared files."""
        self._queue.append((route, method, status, seconds))

    def flush(self) -> None:
        """Write the requests queued since the last flush into this process's files: every
        ``FLUSH_INTERVAL`` seconds, before this process answers a scrape, and at exit."""
        with self._flushing:
            self._flush()

    def _flush(self) -> None:
        totals: dict[tuple[str, str, int], list[Any]] = {}
        queue, bounds = self._queue, self._bounds
        try:
            while True:
                route, method, status, seconds = queue.popleft()
                if method not in METHODS:
                    method = "other"
                entry = totals.get((route, method, status))
                if entry is None:
                    entry = totals[(route, method, status)] = [0, 0.0, [0] * len(DURATION_BUCKETS)]
                entry[0] += 1
                entry[1] += seconds
                entry[2][bisect.bisect_left(bounds, seconds)] += 1
        except IndexError:  # drained
            pass
        for (route, method, status), (count, seconds, buckets) in totals.items():
            cells = self._requests.get((route, method, status))
            if cells is None:
                counter = self._cell("keygate_requests_total", "keygate_requests", (route, method, str(status)))
                total, bucket_cells = self._histogram("keygate_request_duration_seconds", (route,))
                cells = self._requests[(route, method, status)] = (counter, total, bucket_cells)
            counter, total, bucket_cells = cells
            with self._lock:
                if not self._files:
                    return  # closed
                for cell, amount in ((counter, count), (total, seconds),
                                     *((c, n) for c, n in zip(bucket_cells, buckets) if n)):
                    cell[2] += amount
                    cell[0].write_value(cell[1], cell[2], 0.0)

    def initialise(self, **label_values: tuple[str, ...]) -> None:
        """Create series at zero (``keygate_auth_refusals=("invalid_credentials", ...)``), so
        alerts and dashboards see them before the first event."""
        for metric, values in label_values.items():
            kind = DEFINITIONS[metric][0]
            for value in values or ((),):
                labels = (value,) if isinstance(value, str) else tuple(value)
                if kind == "histogram":
                    self._histogram(metric, labels)
                elif kind == "counter":
                    self._cell(metric + "_total", metric, labels)

    def close(self) -> None:
        """Write what is pending and close the files; the gauges' file goes (a dead worker's
        view is no one's)."""
        self._stopped.set()
        self.flush()
        with self._lock:
            for kind, file in self._files.items():
                file.close()
                if kind == "gauge":
                    try:
                        os.unlink(file._fname)  # noqa: SLF001 -- the library keeps the name there
                    except OSError:
                        pass
            self._files.clear()
            self._cells.clear()
            self._histograms.clear()
            self._requests.clear()


def _flush_every(ref: weakref.ref[Metrics], stopped: threading.Event, interval: float) -> None:
    """The flusher thread; it holds its ``Metrics`` only weakly, so an app that is dropped
    (tests build hundreds) takes its thread with it."""
    while not stopped.wait(interval):
        metrics = ref()
        if metrics is None:
            return
        try:
            metrics.flush()
        except Exception:  # a full disk, say: keep counting, try again
            logging.getLogger("keygate.metrics").warning("could not write the metrics files", exc_info=True)
        del metrics


def _private_mmap(path: Path) -> MmapedDict:
    private_file(path)  # 0600 before prometheus-client opens it (it would follow the umask)
    return MmapedDict(str(path))


def clean_directory(directory: Path) -> None:
    """Remove every metrics file of an earlier run (the server does this before its
    workers start: counts begin at zero with the server)."""
    private_dir(directory.parent)
    private_dir(directory)
    for path in directory.glob("*.db"):
        path.unlink(missing_ok=True)


class StoreCollector:
    """``keygate_keys{state}`` and ``keygate_keys_expiring{within}``, from one aggregate
    query of the store at most every ``KEYS_REFRESH`` seconds (per process), and
    ``keygate_build_info``. A store that doesn't answer leaves these out of the scrape
    (the backend gauge says why) rather than failing it."""

    def __init__(self, store: KeyStore, version: str) -> None:
        self.store = store
        self.version = version
        self._counts: dict[str, int] | None = None
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def _key_counts(self) -> dict[str, int] | None:
        with self._lock:
            if time.monotonic() - self._read_at >= KEYS_REFRESH:
                now = time.time()
                try:
                    self._counts = self.store.key_states(now, now + EXPIRING_WITHIN[1])
                except StoreUnavailable:
                    self._counts = None
                self._read_at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        info = GaugeMetricFamily("keygate_build_info", "The running keygate's version.", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        counts = self._key_counts()
        if counts is None:
            return
        states = GaugeMetricFamily("keygate_keys", "Keys in the store by state (read every 30 s).",
                                   labels=["state"])
        for state in ("active", "grace", "revoked", "expired"):
            states.add_metric([state], counts[state])
        yield states
        expiring = GaugeMetricFamily("keygate_keys_expiring", "Live keys that expire within the window.",
                                     labels=["within"])
        expiring.add_metric([EXPIRING_WITHIN[0]], counts["expiring"])
        yield expiring


def exposition(metrics: Metrics, collector: StoreCollector) -> bytes:
    """The Prometheus text exposition of every process's values plus the store's."""
    metrics.flush()  # this worker's own requests, up to now
    directory = metrics.directory
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry)
