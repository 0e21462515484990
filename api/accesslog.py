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
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from keys.auth import PRINCIPAL_ENVIRON_KEY
from keys.redact import redact, redact_query

from .instrument import REQUEST_ID_KEY, ROUTE_KEY

log = logging.getLogger("keygate.access")

#: At most this many seconds pass between a request and its line in the access log.
ACCESS_LOG_INTERVAL = 0.25

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# What a log line can't hold as it is: controls, quotes, backslashes, anything not ASCII.
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _escape(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case: one C-level scan, no regex
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                       else f"\\u{ord(m.group()):04x}", text)


class AccessLog:
    """WSGI middleware: a record per request, with its redacted fields.

    It also names the server ``keygate`` (``Server``), so no response names the stack.
    """

    def __init__(self, app: WSGIApp, logger: logging.Logger = log) -> None:
        self.app = app
        self.logger = logger

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
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
                fields = self.fields(environ, sent, time.perf_counter() - started)
                self.logger.info("request", extra={"access": fields})

    def fields(self, environ: dict[str, Any], sent: list[Any], duration: float) -> dict[str, Any]:
        """What the log says about a request: nothing that may hold a credential unredacted,
        the key's id (never the key), the route template and the request id."""
        status, length = 500, None  # an app that raised instead of answering
        if sent:
            status = int(sent[0][:3])
            for name, value in sent[1]:
                if name == "Content-Length" or name.lower() == "content-length":
                    length = int(value) if value.isdigit() else None
                    break
        path = redact(environ.get("PATH_INFO", ""))
        query = environ.get("QUERY_STRING")
        if query:
            path += "?" + redact_query(query)
        referer = environ.get("HTTP_REFERER")
        agent = environ.get("HTTP_USER_AGENT")
        principal = environ.get(PRINCIPAL_ENVIRON_KEY)
        return {
            "request_id": environ.get(REQUEST_ID_KEY),
            "client": environ.get("REMOTE_ADDR") or None,
            "method": environ.get("REQUEST_METHOD", "-"),
            "path": path,
            "route": environ.get(ROUTE_KEY),
            "protocol": environ.get("SERVER_PROTOCOL", "-"),
            "status": status,
            "bytes": length,
            "duration_ms": round(duration * 1000, 3),
            "key_id": principal.key_id if principal is not None else None,
            "referer": redact(referer) if referer else None,
            "user_agent": redact(agent) if agent else None,
        }


class CombinedFormatter(logging.Formatter):
    """The Combined Log Format line of an access record, plus its duration and request id:

    ``127.0.0.1 - - [02/Dec/2026:10:00:00 +0000] "GET /data?token=[REDACTED] HTTP/1.1"
    200 134 "-" "curl/8.0" 0.412ms 4bf92f3577b34da6a3ce929d0e0e4736``

    The timestamp is formatted once per second rather than per line.
    """

    _second = -1
    _text = ""

    def format(self, record: logging.LogRecord) -> str:
        f = getattr(record, "access", None)
        if f is None:
            return super().format(record)
        t = int(record.created)
        if t != self._second:
            self._second, self._text = t, time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(t))
        referer, agent = f["referer"], f["user_agent"]
        return (
            f'{f["client"] or "-"} - - [{self._text}] "{_escape(f["method"])} {_escape(f["path"])} '
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
        os.register_at_fork(after_in_child=self._forked)

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
            threading.Thread(target=self._write_later, name="access-log", daemon=True).start()

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

    def _write_later(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._lines:
                self.flush()

    def close(self) -> None:
        self.flush()
        super().close()


def flush_access_logs() -> None:
    """Write out what every batched handler holds (a worker's last requests, at its exit)."""
    for handler in logging.getLogger("keygate.access").handlers:
        if isinstance(handler, BatchedStreamHandler):
            handler.flush()

