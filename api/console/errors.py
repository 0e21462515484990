"""The console's errors: an HTML page with the error's status, or problem+json for a client
that prefers JSON; with the console's headers either way."""

from __future__ import annotations

import logging

from flask import Response, render_template, request
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException

from keys.exc import InvalidRequest, KeygateError, MethodNotAllowed, NotFound

from .. import problems
from .headers import secure

log = logging.getLogger("keygate.console")
_MEDIA = ["text/html", "application/problem+json", "application/json"]


def prefers_json() -> bool:
    return request.accept_mimetypes.best_match(_MEDIA, default="text/html") != "text/html"


def _describe(e: BaseException) -> tuple[int, str, str, str, dict[str, str]]:
    """(status, code, title, detail, headers) of any error, in the API's terms."""
    if isinstance(e, CSRFError):  # Flask-WTF says 400; the contract says 403, changing nothing
        return 403, "csrf_failed", "Form expired or forged", (
            f"{e.description} Reload the page and submit the form again."), {}
    if isinstance(e, KeygateError):
        return e.status, e.code, e.title, e.detail, e.headers()
    if isinstance(e, HTTPException):
        headers = {"Allow": ", ".join(e.valid_methods)} if getattr(e, "valid_methods", None) else {}  # type: ignore[attr-defined]
        known: KeygateError | None = {
            404: lambda: NotFound(f"nothing at {request.path}"),
            405: lambda: MethodNotAllowed(f"{request.method} is not allowed on {request.path}"),
            400: lambda: InvalidRequest(e.description or "malformed request"),
        }.get(e.code or 500, lambda: None)()
        if known is not None:
            return known.status, known.code, known.title, known.detail, headers
        return e.code or 500, (e.name or "error").lower().replace(" ", "_"), e.name, e.description or e.name, headers
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
    return 500, "internal_error", "Internal error", "The server failed; it has been logged.", {}


def render_error(e: BaseException) -> Response:
    """Registered as the console's renderer (``problems.ERROR_RENDERER_ENVIRON_KEY``)."""
    status, code, title, detail, headers = _describe(e)
    if prefers_json():
        if isinstance(e, (KeygateError, HTTPException)) and not isinstance(e, CSRFError):
            resp = problems.problem_response(e)
        else:
            resp = problems.problem(status, code, title, detail)
    else:
        resp = Response(render_template("console/error.html", status=status, code=code, title=title,
                                        detail=detail), status=status, mimetype="text/html")
    resp.headers.update(headers)
    return secure(resp)
