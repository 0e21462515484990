"""The access log: one line per request, written by keygate's server around any WSGI app.

The server (granian) has an access log of its own, but it can't see what keygate
must keep out of a log, so this middleware writes it instead: every value that may
carry a credential goes through ``keys.redact`` first (the query string, whatever its
parameter names are encoded as, and the Referer and User-Agent headers), and every
control or non-ASCII character is escaped, so a request can't forge a log line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from keys.redact import redact, redact_query

log = logging.getLogger("keygate.access")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# What a log line can't hold as it is: controls, quotes, backslashes, anything not ASCII.
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _escape(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text  # the common case: one C-level scan, no regex
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                       else f"\\u{ord(m.group()):04x}", text)


class _Clock:
    """The Common Log Format timestamp, formatted once per second rather than per line."""

    second = -1
    text = ""

    def now(self) -> str:
        t = int(time.time())
        if t != self.second:
            self.second, self.text = t, time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(t))
        return self.text


class AccessLog:
    """WSGI middleware: a Combined Log Format line per request, plus its duration.

    ``127.0.0.1 - - [02/Dec/2026:10:00:00 +0000] "GET /data?token=[REDACTED] HTTP/1.1"
    200 134 "-" "curl/8.0" 0.412ms``

    It also names the server ``keygate`` (``Server``), so no response names the stack.
    """

    def __init__(self, app: WSGIApp, logger: logging.Logger = log) -> None:
        self.app = app
        self.logger = logger
        self._clock = _Clock()

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
                self.logger.info(self.line(environ, sent, time.perf_counter() - started))

    def line(self, environ: dict[str, Any], sent: list[Any], duration: float) -> str:
        status, length = "500", "-"  # an app that raised instead of answering
        if sent:
            status = sent[0][:3]
            for name, value in sent[1]:
                if name == "Content-Length" or name.lower() == "content-length":
                    length = value
                    break
        target = _escape(redact(environ.get("PATH_INFO", "")))
        query = environ.get("QUERY_STRING")
        if query:
            target += "?" + _escape(redact_query(query))
        referer = environ.get("HTTP_REFERER")
        agent = environ.get("HTTP_USER_AGENT")
        return (
            f'{environ.get("REMOTE_ADDR") or "-"} - - [{self._clock.now()}] '
            f'"{environ.get("REQUEST_METHOD", "-")} {target} '
            f'{environ.get("SERVER_PROTOCOL", "-")}" {status} {length} '
            f'"{_escape(redact(referer)) if referer else "-"}" '
            f'"{_escape(redact(agent)) if agent else "-"}" {duration * 1000:.3f}ms'
        )
