"""The backing services (the key store, the rate limiter): are they answering?

Requests, the usage flusher and ``/readyz`` report what they find to ``Backends``, which
logs an outage once as it starts (WARNING) and once as it ends (INFO) — not once per
request — counts every failure (``keygate_backend_errors_total``) and keeps
``keygate_backend_up`` current. ``Readiness`` answers ``/readyz`` within its budget even
when a backend hangs: each check runs on a thread of its own, and a check still
running from an earlier probe is waited for again rather than started twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from keys.exc import KeygateError
from keys.store.breaker import describe

from .metrics import Metrics

log = logging.getLogger("keygate.backends")

STORE = "store"
RATE_LIMITER = "rate_limiter"
NAMES = {STORE: "the key store", RATE_LIMITER: "the rate-limit store"}
#: Seconds a readiness probe waits for a backend before calling it down.
PROBE_TIMEOUT = 1.0


class Backends:
    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._down: dict[str, float] = {}  # backend -> when its outage began (monotonic)
        self._lock = threading.Lock()
        if metrics is not None:
            for backend in NAMES:
                metrics.set_gauge("keygate_backend_up", 1.0, backend)

    def failed(self, backend: str, error: BaseException,
               consequence: str = "answering 503 until it is back") -> None:
        """A call to ``backend`` failed (a request's 503, a flush, a probe)."""
        if self.metrics is not None:
            self.metrics.inc("keygate_backend_errors", backend)
        if backend in self._down:
            return
        with self._lock:
            if backend in self._down:
                return
            self._down[backend] = time.monotonic()
        if self.metrics is not None:
            self.metrics.set_gauge("keygate_backend_up", 0.0, backend)
        # The cause, for the operator: a client's 503 detail is generic on purpose.
        cause = error.__cause__
        reason = describe(cause) if cause is not None else " ".join(str(getattr(error, "detail", None) or error).split())
        reason = reason[:300]
        log.warning("%s is unavailable (%s); %s", NAMES[backend], reason, consequence)

    def ok(self, backend: str) -> None:
        """A call to ``backend`` succeeded; on the request path: one dict lookup when all is well."""
        if backend not in self._down:
            return
        with self._lock:
            began = self._down.pop(backend, None)
        if began is None:
            return
        if self.metrics is not None:
            self.metrics.set_gauge("keygate_backend_up", 1.0, backend)
        log.info("%s is available again after %.1f s", NAMES[backend], time.monotonic() - began)

    def is_down(self, backend: str) -> bool:
        return backend in self._down


class _Probe:
    """One backend's check, run on one long-lived daemon thread (a hung check holds that
    thread only, and later probes wait on the same attempt instead of piling up)."""

    def __init__(self, name: str, check: Callable[[], object]) -> None:
        self.name = name
        self.check = check
        self._pending: Future[None] | None = None
        self._queue: queue.SimpleQueue[Future[None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> Future[None]:
        with self._lock:
            if self._pending is None:
                self._pending = Future()
                self._queue.put(self._pending)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"keygate-probe-{self.name}",
                                                    daemon=True)
                    self._thread.start()
            return self._pending

    def _run(self) -> None:
        while True:
            future = self._queue.get()
            try:
                self.check()
            except BaseException as e:  # noqa: BLE001 -- whatever it was, the probe reports it
                future.set_exception(e)
            else:
                future.set_result(None)
            finally:
                with self._lock:
                    self._pending = None


class Readiness:
    """``/readyz``: every backend checked at once, each given ``timeout`` seconds."""

    def __init__(self, backends: Backends, checks: dict[str, Callable[[], object]],
                 timeout: float = PROBE_TIMEOUT) -> None:
        self.backends = backends
        self.timeout = timeout
        self._probes = {name: _Probe(name, check) for name, check in checks.items()}

    def check(self) -> dict[str, str | None]:
        """Backend -> ``None`` when it answered, else why not."""
        started = {name: probe.start() for name, probe in self._probes.items()}
        deadline = time.monotonic() + self.timeout
        results: dict[str, str | None] = {}
        for name, future in started.items():
            try:
                future.result(max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                error: BaseException = TimeoutError(f"no answer within {self.timeout:g} s")
            except KeygateError as e:
                error = e
            except Exception as e:  # a driver's own error: still "down", never a 500
                error = e
            else:
                self.backends.ok(name)
                results[name] = None
                continue
            self.backends.failed(name, error)
            results[name] = " ".join(str(getattr(error, "detail", None) or error).split())[:200]
        return results
