"""The access log: one record per request, written by keygate's server around any WSGI app.

The server (granian) has an access log of its own, but it can't see what keygate
must keep out of a log, so this middleware writes it instead: every value that may
carry a credential goes through ``keys.redact`` first (the query string, whatever its
parameter names are encoded as, and the Referer and User-Agent headers). The record
carries the request's fields (``record.access``); the handler's formatter writes them
as a Combined Log Format line (``CombinedFormatter``, the default, every control or
non-ASCII character escaped so a request can't forge a line) or as one JSON object
(``api.logformat.JsonFormatter``, ``KEYGATE_LOG_FORMAT=json``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from keys.auth import PRINCIPAL_ENVIRON_KEY
from keys.forking import after_fork_in_child
from keys.redact import redact, redact_query

from .instrument import REQUEST_ID_KEY, ROUTE_KEY

log = logging.getLogger("keygate.access")

#: The access log writes its lines out at most this many seconds apart; a request's record
#: waits for at most half of it first (``AccessLog``).
ACCESS_LOG_INTERVAL = 0.25

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Every access log of this process, for ``flush_access_logs``.
_access_logs: weakref.WeakSet[AccessLog] = weakref.WeakSet()

# What a log line can't hold as it is: controls, quotes, backslashes, anything not ASCII.
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _escape(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case: one C-level scan, no regex
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                       else f"\\u{ord(m.group()):04x}", text)


class AccessLog:
    """WSGI middleware: a record per request, with its redacted fields.

    A request only notes what its record needs (a tuple of raw values, ~1 µs); the records
    are built, redacted and handed to logging in runs of up to ``BATCH`` (or once the oldest
    waited half of ``ACCESS_LOG_INTERVAL``, or at a worker's exit: ``flush_access_logs``).
    Built one by one, amid the request's own code, a record cost about twice what it costs
    in a run (16 against 9 µs of a request in process, ``bench/bench_accesslog.py``). Each
    record still carries its request's time (``created``).

    It also names the server ``keygate`` (``Server``), so no response names the stack.
    """

    #: Requests noted before their records are written (a request pays for the run).
    BATCH = 64
    #: Requests noted at most while another thread writes.
    MAX_PENDING = 16 * BATCH

    def __init__(self, app: WSGIApp, logger: logging.Logger = log, interval: float = ACCESS_LOG_INTERVAL) -> None:
        self.app = app
        self.logger = logger
        self.wait = interval / 2  # the handler may hold a line the other half (BatchedStreamHandler)
        # A deque, never swapped: appends from request threads can't land in a run already written.
        self._pending: deque[tuple[Any, ...]] = deque()
        self._oldest = 0.0
        self._writing = threading.Lock()  # one run at a time, so lines keep their order
        self._flusher = False  # a thread of this process writes out what a quiet spell leaves
        _access_logs.add(self)
        after_fork_in_child(self._forked)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        created = time.time()
        started = time.perf_counter()
        sent: list[Any] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("Server", "keygate"))
            sent[:] = (status, headers)
            return start_response(status, headers, exc_info)

        try:
            return self.app(environ, start)
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                self._note(created, time.perf_counter() - started, environ, sent)

    def _note(self, created: float, duration: float, environ: dict[str, Any], sent: list[Any]) -> None:
        principal = environ.get(PRINCIPAL_ENVIRON_KEY)
        pending = self._pending
        if not pending:
            self._oldest = created  # a race here only moves when a run is written
        pending.append((created, duration, sent[0] if sent else None, sent[1] if sent else None,
                        environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", ""),
                        environ.get("QUERY_STRING"), environ.get("SERVER_PROTOCOL", "-"),
                        environ.get("REMOTE_ADDR"), environ.get("HTTP_REFERER"), environ.get("HTTP_USER_AGENT"),
                        principal.key_id if principal is not None else None,
                        environ.get(REQUEST_ID_KEY), environ.get(ROUTE_KEY)))
        if len(pending) >= self.BATCH or created - self._oldest >= self.wait:
            # Behind a writer stuck on a full stdout, requests wait for it once this many are
            # noted, as they did when each wrote its own line: a stalled log is backpressure,
            # never unbounded memory.
            self.write_pending(blocking=len(pending) >= self.MAX_PENDING)
        elif not self._flusher:
            self._flusher = True
            threading.Thread(target=_write_later, args=(weakref.ref(self), self.wait),
                             name="access-records", daemon=True).start()

    def write_pending(self, blocking: bool = True) -> None:
        """Hand every noted request's record to logging. Without ``blocking``, a thread that
        finds another one writing leaves its requests to that one."""
        if not self._writing.acquire(blocking=blocking):
            return
        try:
            logger, pop, fields = self.logger, self._pending.popleft, self.fields
            while True:
                try:
                    entry = pop()
                except IndexError:
                    break
                try:
                    record = logger.makeRecord(logger.name, logging.INFO, "(access log)", 0, "request", (), None,
                                               extra={"access": fields(*entry[1:])})
                    record.created = created = entry[0]
                    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
                    logger.handle(record)
                except Exception:  # one bad record must cost neither the others nor a response
                    logging.getLogger("keygate").exception("an access log record could not be written")
        finally:
            self._writing.release()

    def write_quiet_spell(self) -> None:
        """A quiet spell's requests: written within ``wait`` seconds, lines and all."""
        if self._pending:
            self.write_pending()
            for handler in self.logger.handlers:
                handler.flush()

    def _forked(self) -> None:
        self._pending, self._flusher = deque(), False  # the parent's requests and thread are not the child's
        self._writing = threading.Lock()

    @staticmethod
    def fields(duration: float, status_line: str | None, headers: list[tuple[str, str]] | None, method: str,
                path: str, query: str | None, protocol: str, client: str | None, referer: str | None,
                agent: str | None, key_id: str | None, request_id: str | None, route: str | None) -> dict[str, Any]:
        """What the log says about a request: nothing that may hold a credential unredacted,
        the key's id (never the key), the route template and the request id."""
        status, length = 500, None  # an app that raised instead of answering
        if status_line is not None:
            status = int(status_line[:3])
            for name, value in headers or ():
                if name == "Content-Length" or name.lower() == "content-length":
                    length = int(value) if value.isdigit() else None
                    break
        path = redact(path)
        if query:
            path += "?" + redact_query(query)
        return {
            "request_id": request_id,
            "client": client or None,
            "method": method,
            "path": path,
            "route": route,
            "protocol": protocol,
            "status": status,
            "bytes": length,
            "duration_ms": round(duration * 1000, 3),
            "key_id": key_id,
            "referer": redact(referer) if referer else None,
            "user_agent": redact(agent) if agent else None,
        }


class CombinedFormatter(logging.Formatter):
    """The Combined Log Format line of an access record, plus its duration and request id:

    ``127.0.0.1 - - [02/Dec/2026:10:00:00 +0000] "GET /data?token=[REDACTED] HTTP/1.1"
    200 134 "-" "curl/8.0" 0.412ms 4bf92f3577b34da6a3ce929d0e0e4736``

    The timestamp is formatted once per second rather than per line.
    """

    _second: tuple[int, str] = (-1, "")  # one attribute: threads never see half of an update

    def format(self, record: logging.LogRecord) -> str:
        f = getattr(record, "access", None)
        if f is None:
            return super().format(record)
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(second))
            self._second = (second, text)
        referer, agent = f["referer"], f["user_agent"]
        return (
            f'{f["client"] or "-"} - - [{text}] "{_escape(f["method"])} {_escape(f["path"])} '
            f'{_escape(f["protocol"])}" {f["status"]} {"-" if f["bytes"] is None else f["bytes"]} '
            f'"{_escape(referer) if referer else "-"}" "{_escape(agent) if agent else "-"}" '
            f'{f["duration_ms"]:.3f}ms {f["request_id"] or "-"}'
        )


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes its records out together at most every ``interval``
    seconds instead of one write per record: the servers' workers write through
    (``PYTHONUNBUFFERED``), and a write per request was about an eighth of a worker's time
    under load (bench/README.md). A thread writes out what a quiet spell leaves behind, and
    ``close()`` (logging's shutdown; the server calls ``flush_access_logs`` as a worker exits)
    the rest."""

    def __init__(self, stream: Any = None, interval: float = ACCESS_LOG_INTERVAL) -> None:
        super().__init__(stream)
        self.interval = interval
        self._lines: list[str] = []
        self._written = 0.0
        self._flusher = False  # a thread of this process writes out what a quiet spell leaves
        after_fork_in_child(self._forked)

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        now = time.monotonic()
        if now - self._written >= self.interval:
            self._write_out(now)
        elif not self._flusher:
            self._flusher = True
            threading.Thread(target=_write_later, args=(weakref.ref(self), self.interval),
                             name="access-log", daemon=True).start()

    def _forked(self) -> None:
        self._flusher = False  # the parent's thread is not in the child

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_out(time.monotonic())
        finally:
            self.release()

    def _write_out(self, now: float) -> None:
        self._written = now
        if self._lines:
            text = self.terminator.join(self._lines) + self.terminator
            self._lines.clear()
            try:
                self.stream.write(text)
            except Exception:
                logging.raiseExceptions and logging.Handler.handleError(self, None)  # type: ignore[arg-type, func-returns-value]
        super().flush()

    def write_quiet_spell(self) -> None:
        if self._lines:
            self.flush()

    def close(self) -> None:
        self.flush()
        super().close()


def _write_later(ref: weakref.ref[AccessLog] | weakref.ref[BatchedStreamHandler], interval: float) -> None:
    """A writer thread: what a quiet spell leaves, written every ``interval`` seconds. It
    holds its object weakly, so a dropped access log or handler (tests make many) takes its
    thread with it, where a bound method kept both alive for good."""
    while True:
        time.sleep(interval)
        owner = ref()
        if owner is None:
            return
        owner.write_quiet_spell()
        del owner


def flush_access_logs() -> None:
    """Write out every request an access log has noted and every line a batched handler
    holds (a worker's last requests, at its exit)."""
    for access_log in list(_access_logs):
        access_log.write_pending()
    for handler in logging.getLogger("keygate.access").handlers:
        if isinstance(handler, BatchedStreamHandler):
            handler.flush()

