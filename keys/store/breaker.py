"""A circuit breaker for the key store: a database that stopped answering is not asked again
for a moment, so requests are answered 503 at once instead of each waiting for a timeout.

Without it every request that needs the store would wait out its own timeout during an
outage, tying up every serving thread (and so the health check too). Once the database timed
out, it is left alone for ``cooldown`` seconds; then one caller at a time tries, until one
of them gets an answer.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("keygate.store")


class Breaker:
    """Whether the database may be asked now: closed (yes), tripped (no, for ``cooldown``
    seconds, then yes for one caller at a time until one of them gets an answer).

    The connections report to it (``failed``, ``succeeded``); the store asks it (``allow``)."""

    def __init__(self, cooldown: float = 1.0, trial_lease: float = 3.0) -> None:
        self.cooldown = cooldown
        self.trial_lease = trial_lease  # how long one caller's attempt blocks the others
        self.tripped = False
        self._open_until = 0.0
        self._trial_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether this caller may ask the database (every caller, unless it stopped answering)."""
        if not self.tripped:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._open_until or now < self._trial_until:
                return False
            self._trial_until = now + self.trial_lease
            return True

    def cooling_down(self) -> bool:
        """True right after a trip: no connection attempt is worth making yet."""
        return self.tripped and time.monotonic() < self._open_until

    def failed(self, cause: BaseException) -> None:
        with self._lock:
            if not self.tripped:
                log.warning("key store not answering (%s); answering 503 until it is back",
                            describe(cause))
            self.tripped = True
            self._open_until = time.monotonic() + self.cooldown
            self._trial_until = 0.0

    def shut(self) -> None:
        """For good: the store was closed, and a late caller (a background flush or prune)
        must not open a connection nobody will close."""
        with self._lock:
            self.tripped = True
            self._open_until = float("inf")

    def succeeded(self) -> None:
        if self.tripped:
            with self._lock:
                if self.tripped and self._open_until != float("inf"):
                    self.tripped = False
                    log.warning("key store answering again")


class OutageLog:
    """The cause of a 503, in the server's log: one line per 10 s, not one per request."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._last > 10:
            self._last = now
            log.warning("key store unavailable: %s", describe(e))


def describe(e: BaseException) -> str:
    """One line about a database failure, for the server's log (never for a client)."""
    cause = getattr(e, "orig", None) or e
    text = " ".join(str(cause).split())[:300]
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__
