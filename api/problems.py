"""Every error as RFC 9457 ``application/problem+json``, with the contract's ``code``.

One function, ``problem_response``, renders any exception; it is wired into
Flask (404/405 outside any resource, anything else) and into Flask-RESTX
(errors raised inside resources), so there is exactly one error shape.
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from keys.exc import (
    InvalidRequest,
    KeygateError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
)
from keys.ratelimit import RateLimitUnavailable
from keys.redact import redact

from .instrument import REQUEST_ID_KEY

# Stable, non-dereferenceable type URIs (RFC 9457 §3.1.1 suggests tag: URIs for these).
PROBLEM_TYPE_BASE = "tag:keygate,2026:problem/"
#: Where a part of the app that answers errors its own way (the console's HTML pages) puts
#: its renderer, ``render(error) -> Response``, in the WSGI environ of its requests.
ERROR_RENDERER_ENVIRON_KEY = "keygate.error_renderer"
log = logging.getLogger("keygate.api")

_HTTP_CODES = {
    400: InvalidRequest,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def problem(status: int, code: str, title: str, detail: str) -> Response:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "instance": redact(request.path),  # a key pasted into a URL is not echoed back
    }
    request_id = request.environ.get(REQUEST_ID_KEY)
    if request_id is not None:  # RFC 9457 extension member: quote it when reporting a problem
        body["request_id"] = request_id
    return current_app.response_class(json.dumps(body), status=status, mimetype="application/problem+json")


def _from_http_exception(e: HTTPException) -> KeygateError | None:
    cls = _HTTP_CODES.get(e.code or 500)
    if cls is None:
        return None
    if cls is NotFound:
        return NotFound(f"nothing at {redact(request.path)}")
    if cls is MethodNotAllowed:
        return MethodNotAllowed(f"{request.method} is not allowed on {redact(request.path)}")
    if cls is PayloadTooLarge:
        return PayloadTooLarge("the body is too large")
    # Flask-RESTX puts validation details in e.data; werkzeug in e.description.
    errors = (getattr(e, "data", None) or {}).get("errors")
    if errors:
        field, message = next(iter(errors.items()))
        return InvalidRequest(f"{field}: {message}", field=str(field))
    return InvalidRequest(e.description or "malformed request")


def problem_response(e: BaseException) -> Response:
    """The problem+json response for any exception raised while serving."""
    render = request.environ.pop(ERROR_RENDERER_ENVIRON_KEY, None)
    if render is not None:  # popped: the renderer may answer with this function in turn
        return render(e)
    extra: dict[str, str] = {}
    if isinstance(e, HTTPException):
        if getattr(e, "valid_methods", None):
            extra["Allow"] = ", ".join(e.valid_methods)  # type: ignore[attr-defined]
        converted = _from_http_exception(e)
        if converted is None:  # a status the contract has no code for (413, 415, ...)
            status = e.code or 500
            code = (e.name or "error").lower().replace(" ", "_")
            return problem(status, code, e.name, e.description or e.name)
        e = converted
    if isinstance(e, StoreUnavailable) and not isinstance(e, RateLimitUnavailable):
        # (the rate limiter's outages are reported where they are caught: api/ratelimits.py)
        backends = current_app.extensions.get("keygate.backends")
        if backends is not None:
            backends.failed("store", e)
    if not isinstance(e, KeygateError):
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
        return problem(500, "internal_error", "Internal error", "The server failed; it has been logged.")
    resp = problem(e.status, e.code, e.title, e.detail)
    resp.headers.update(e.headers())
    resp.headers.update(extra)
    return resp


def register_problem_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, problem_response)
    app.register_error_handler(KeygateError, problem_response)
    app.register_error_handler(Exception, problem_response)
