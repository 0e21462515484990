"""Request ids and request metrics: WSGI middleware around the Flask app itself, so every
server (``serve``, another WSGI server, a test client) gets them.

A request keeps the ``X-Request-ID`` it came with when that is 1-128 characters of
``[A-Za-z0-9._-]`` (a proxy's or a client's id, safe to log as it is); anything else is
replaced by a generated one. The id goes back in the response's ``X-Request-ID``, into
problem+json bodies (``request_id``) and into every log line about the request.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from .metrics import UNMATCHED, Metrics

#: Where the request's id, and its route template once routed, are kept in the WSGI environ.
REQUEST_ID_KEY = "keygate.request_id"
ROUTE_KEY = "keygate.route"
STATUS_KEY = "keygate.status"
_VALID_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_bits = random.getrandbits

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def new_request_id() -> str:
    """128 random bits as 32 hex digits. An id must be unique, not unguessable, so it comes
    from ``random`` (reseeded from the OS in every forked worker), not a system call."""
    return f"{_bits(128):032x}"


class Instrumented:
    """Assigns the request id, and counts and times the request by its route template
    (``keygate_requests_total``, ``keygate_request_duration_seconds``).

    The response (``api.responses.KeygateResponse``) sends the id back and leaves its status
    and route template in the environ as it is sent: no ``start_response`` wrapper, which
    would cost a closure and a call per request.
    """

    def __init__(self, app: WSGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        incoming = environ.get("HTTP_X_REQUEST_ID")
        if incoming is not None and len(incoming) <= 128 and _VALID_ID.fullmatch(incoming):
            environ[REQUEST_ID_KEY] = incoming
        else:
            environ[REQUEST_ID_KEY] = f"{_bits(128):032x}"  # new_request_id(), without the call
        try:
            return self.app(environ, start_response)
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(environ.get(ROUTE_KEY, UNMATCHED), environ.get("REQUEST_METHOD", ""),
                                             environ.get(STATUS_KEY, 500), time.perf_counter() - started)
