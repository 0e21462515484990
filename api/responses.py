"""keygate's response class: its fixed security headers, and a body sent in one piece."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Response

from keys.auth import PRINCIPAL_ENVIRON_KEY

from .instrument import REQUEST_ID_KEY, ROUTE_KEY, STATUS_KEY
from .metrics import UNMATCHED

#: RFC 6797: once a browser has seen keygate over HTTPS, it never tries plain HTTP for a year.
HSTS = ("Strict-Transport-Security", "max-age=31536000")


_NO_STORE_STATUSES = frozenset({401, 403, 429})


class KeygateResponse(Response):
    """Adds ``X-Content-Type-Options`` always; ``Cache-Control: no-store`` to authenticated
    responses and to refusals (401/403/429), so neither is ever cached; HSTS when the
    request came over HTTPS; and ``X-Request-ID`` (``api.instrument``).

    They are appended to the WSGI header list as the response is sent, from what the
    request left in the environ: no after-request hook, and no ``headers[...] =``, which
    validates each value and rewrites the list (~1 µs a header, every request) for what
    are constants.
    """

    def get_wsgi_response(self, environ: dict[str, Any]) -> tuple[Iterable[bytes], str, list[tuple[str, str]]]:
        no_store = PRINCIPAL_ENVIRON_KEY in environ or self.status_code in _NO_STORE_STATUSES
        # A scan, not ``in self.headers``: werkzeug answers an absent name by raising and
        # catching a ``BadRequestKeyError``, ~3 µs of every authenticated request.
        if no_store and any(name.lower() == "cache-control" for name, _value in self.headers):
            del self.headers["Cache-Control"]  # no-store replaces whatever was said
        app_iter, status, headers = super().get_wsgi_response(environ)
        headers.append(("X-Content-Type-Options", "nosniff"))
        if no_store:
            headers.append(("Cache-Control", "no-store"))
        if environ.get("wsgi.url_scheme") == "https":
            headers.append(HSTS)
        request_id = environ.get(REQUEST_ID_KEY)
        if request_id is not None:
            headers.append(("X-Request-ID", request_id))
        # For the metrics and the access log, written after the request context is gone.
        request = environ.get("werkzeug.request")
        rule = request.url_rule if request is not None else None
        environ[ROUTE_KEY] = UNMATCHED if rule is None else rule.rule
        environ[STATUS_KEY] = self.status_code
        return app_iter, status, headers

    def get_app_iter(self, environ: dict[str, Any]) -> Iterable[bytes]:
        """A buffered body as a list: a server sends a list in one write, where werkzeug's
        ``ClosingIterator`` is pulled from chunk by chunk (a call back into Python each)."""
        if not self.is_sequence:
            return super().get_app_iter(environ)
        status = self.status_code
        if environ["REQUEST_METHOD"] == "HEAD" or 100 <= status < 200 or status in (204, 304):
            body: list[bytes] = []
        else:
            body = [b"".join(self.iter_encoded())]
        self.close()  # what the iterator's close() would run; a buffered body holds nothing open
        return body
