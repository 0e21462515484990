"""PostgreSQL connections that can't keep a request waiting on a database that stopped answering.

libpq waits for an answer as long as the TCP connection lives, and a peer that stopped
answering without closing it (a hung server, a proxy or firewall that drops silently,
a failover in progress) keeps it alive: without bounds, a request waits for minutes.
So every wait on the socket (a query, a commit, a ping) gives up after ``io_timeout``
(``psycopg.Connection.wait``'s timeout) and the connection, whose state is then unknown,
is closed; a connection attempt gives up after ``connect_within``'s limit; and both
report to the store's ``Breaker`` (keys/store/breaker.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

import sqlalchemy as sa
from sqlalchemy import event

from .breaker import Breaker

#: Seconds a statement may wait for the server, and a connection attempt may take: one of
#: each stays under the contract's 2 s.
IO_TIMEOUT = 1.0
CONNECT_TIMEOUT = 1.0
#: The server gives up a statement after this many ms even when no client is left to care.
STATEMENT_TIMEOUT_MS = 5000
#: libpq's own bounds: the attempt a helper thread was given up on still ends (2 s is libpq's
#: minimum), and TCP keepalives find a held connection whose peer vanished while it was idle.
LIBPQ_BOUNDS = {"connect_timeout": 2, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                "keepalives_count": 3, "tcp_user_timeout": 10_000}


def connect_args(url: sa.URL) -> dict[str, Any]:
    """libpq's bounds, and the server-side statement timeout added to the URL's own
    ``options`` (which connect arguments would otherwise replace)."""
    options = url.query.get("options", "")
    if isinstance(options, tuple):
        options = " ".join(options)
    return {**LIBPQ_BOUNDS, "options": f"{options} -c statement_timeout={STATEMENT_TIMEOUT_MS}".strip()}


def bound(engine: sa.Engine, breaker: Callable[[], Breaker]) -> None:
    """Every connection ``engine`` makes is a ``BoundedConnection``, made within
    ``CONNECT_TIMEOUT`` and reporting to the store's current ``breaker()``."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return connect_within(lambda: BoundedConnection.connect(*cargs, **cparams), CONNECT_TIMEOUT, breaker())


class BoundedConnection(psycopg.Connection):
    """A psycopg connection whose every wait on the server is bounded (see the module)."""

    #: Seconds a query, commit or ping may wait for the server; ``None``: forever (``init``).
    io_timeout: float | None = IO_TIMEOUT
    breaker: Breaker | None = None

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") is None and len(args) < 2:
            kwargs["timeout"] = self.io_timeout
        started = time.monotonic()
        try:
            result = super().wait(gen, *args, **kwargs)
        except psycopg.OperationalError as e:
            timeout = kwargs.get("timeout")
            if timeout is not None and time.monotonic() - started >= timeout:
                # No answer in time: what the server does with the query is unknown, so the
                # connection can't be used again; the database is presumed unreachable.
                self.close()
                if self.breaker is not None:
                    self.breaker.failed(e)
            raise
        if self.breaker is not None and self.breaker.tripped:
            self.breaker.succeeded()
        return result


def connect_within(connect: Callable[[], BoundedConnection], seconds: float,
                   breaker: Breaker | None = None) -> BoundedConnection:
    """``connect()``, or ``psycopg.errors.ConnectionTimeout`` after ``seconds``.

    psycopg (like libpq) gives a connection attempt at least 2 s, so the attempt runs on a
    helper thread, which the caller stops waiting for; a connection that arrives after that
    is closed (the attempt itself ends by libpq's ``connect_timeout``).
    """
    if breaker is not None and breaker.cooling_down():
        raise psycopg.errors.ConnectionTimeout("the database did not answer a moment ago")
    lock = threading.Lock()
    done = threading.Event()
    outcome: list[Any] = []  # [connection] or [None, error]; empty until the attempt ends
    abandoned = False

    def attempt() -> None:
        try:
            result: list[Any] = [connect()]
        except BaseException as e:  # handed to the waiting caller
            result = [None, e]
        with lock:
            if abandoned:
                if result[0] is not None:
                    result[0].close()
                return
            outcome.extend(result)
        done.set()

    threading.Thread(target=attempt, name="keygate-connect", daemon=True).start()
    if not done.wait(seconds):
        with lock:
            abandoned = not outcome
        if abandoned:
            error = psycopg.errors.ConnectionTimeout(f"no connection within {seconds:g} s")
            if breaker is not None:
                breaker.failed(error)
            raise error
        done.wait()
    if outcome[0] is None:
        # Only a timeout trips the breaker: a refused connection costs nothing to retry.
        if breaker is not None and isinstance(outcome[1], psycopg.errors.ConnectionTimeout):
            breaker.failed(outcome[1])
        raise outcome[1]
    connection: BoundedConnection = outcome[0]
    connection.breaker = breaker
    if breaker is not None:
        breaker.succeeded()
    return connection
