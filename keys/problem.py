"""How ``KeyAuth`` answers a refused request unless the app says otherwise: RFC 9457
``application/problem+json`` with the error's status, code and headers."""

from __future__ import annotations

import json
from typing import Any

from flask import Response, current_app, request

from .exc import KeygateError
from .redact import redact

#: Stable, non-dereferenceable type URIs (RFC 9457 §3.1.1 suggests tag: URIs for these).
PROBLEM_TYPE_BASE = "tag:keygate,2026:problem/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Refusals are about this request and this credential: never to be cached.
_NO_STORE_STATUSES = frozenset({401, 403, 429})


def problem_body(error: KeygateError) -> dict[str, Any]:
    """The RFC 9457 members for ``error``, with its contract ``code`` as an extension member."""
    return {
        "type": PROBLEM_TYPE_BASE + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "instance": redact(request.path),  # a key pasted into a URL is not echoed back
    }


def problem_response(error: KeygateError) -> Response:
    """``error`` as a problem+json response, with the headers it requires (a challenge,
    ``Retry-After``) and ``Cache-Control: no-store`` on a refusal."""
    resp = current_app.response_class(json.dumps(problem_body(error)), status=error.status,
                                      mimetype=PROBLEM_MEDIA_TYPE)
    resp.headers.update(error.headers())
    if error.status in _NO_STORE_STATUSES:
        resp.headers["Cache-Control"] = "no-store"
    return resp
