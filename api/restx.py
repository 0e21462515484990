"""Flask-RESTX, as keygate uses it: problem+json errors, the OpenAPI 3 document in
Swagger UI, and a request path without the work keygate never needs.

Flask-RESTX negotiates the response's media type twice per request (in the
resource and again in ``Api.make_response``), builds a new resource object per
request, and serialises through ``flask.make_response`` and
``Headers.extend``. keygate's resources answer JSON only and keep no state on
the resource object, so for the common ``Accept`` values (none, ``*/*``,
``application/json``) the body is encoded once, straight into the response;
anything else takes RESTX's own path, unchanged (measured in bench/README.md).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from functools import lru_cache
from typing import Any

import flask_restx
from flask import Response, current_app, request, url_for

from .problems import problem_response

_JSON = "application/json"
# Accept values for which RESTX's negotiation can only pick JSON (its one representation).
_ACCEPTS_JSON = frozenset({None, "", "*/*", _JSON})


_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S)


@lru_cache(maxsize=8)
def docs_headers(html: str) -> dict[str, str]:
    """CSP for the Swagger UI page: its scripts and styles come from this server (the page's
    one inline script is allowed by its hash); it calls only this server; nothing frames it.
    Styles may be inline: Swagger UI sets them as it renders, and a style runs no code."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(m.group(1).encode()).digest()).decode() + "'"
        for m in _INLINE_SCRIPT.finditer(html))
    policy = ("default-src 'none'; "
              f"script-src 'self' {hashes}; ".replace("  ", " ")
              + "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer"}


class Resource(flask_restx.Resource):
    """A Flask-RESTX resource dispatched without the second media-type negotiation."""

    init_every_request = False  # one instance serves every request: keep no state on self

    def dispatch_request(self, *args: Any, **kwargs: Any) -> Any:
        if self.representations or self.method_decorators:
            return super().dispatch_request(*args, **kwargs)
        method = request._get_current_object().method  # type: ignore[attr-defined]  # see make_response
        meth = getattr(self, method.lower(), None)
        if meth is None and method == "HEAD":
            meth = getattr(self, "get", None)
        assert meth is not None, f"Unimplemented method {method!r}"
        self.validate_payload(meth)
        return meth(*args, **kwargs)


class KeygateApi(flask_restx.Api):
    """Flask-RESTX ``Api`` whose errors are problem+json like the rest of the app.

    ``docs_spec_endpoint`` names the Flask endpoint whose document the Swagger UI at
    ``doc`` shows, instead of Flask-RESTX's own Swagger 2.0 ``/swagger.json``, which is
    then not served at all: one document, so no client generator picks the lesser one.
    ``GET /`` redirects to the Swagger UI.
    """

    def __init__(self, *args: Any, docs_spec_endpoint: str | None = None, **kwargs: Any) -> None:
        self.docs_spec_endpoint = docs_spec_endpoint
        super().__init__(*args, **kwargs)

    def _register_specs(self, app_or_blueprint: Any) -> None:
        # RESTX's hook for /swagger.json (``add_specs=False`` would drop the Swagger UI too).
        if self.docs_spec_endpoint is None:
            super()._register_specs(app_or_blueprint)

    def render_root(self) -> Response:  # RESTX's view for "/": a 404 by default
        # No body (werkzeug's redirect() writes an HTML page nobody reads).
        return current_app.response_class(status=302, headers={"Location": url_for("doc")})

    @property
    def specs_url(self) -> str:  # read by RESTX's swagger-ui.html template
        if self.docs_spec_endpoint is None:
            return super().specs_url
        return url_for(self.docs_spec_endpoint)  # relative: right behind any proxy or host name

    def handle_error(self, e: Exception) -> Response:  # noqa: D102 (see class docstring)
        return problem_response(e)

    def render_doc(self) -> Response:
        """The Swagger UI page, which may run only its own scripts and never be framed."""
        html = super().render_doc()
        resp = current_app.response_class(html, mimetype="text/html")
        resp.headers.update(docs_headers(html))
        return resp

    def make_response(self, data: Any, *args: Any, **kwargs: Any) -> Response:
        # A proxy's attribute costs ~1 µs (werkzeug's lookup machinery); the object behind
        # it, fetched once, costs plain attribute access.
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        environ = request._get_current_object().environ  # type: ignore[attr-defined]
        if environ.get("HTTP_ACCEPT") not in _ACCEPTS_JSON or app.debug \
                or "fallback_mediatype" in kwargs or app.config.get("RESTX_JSON"):
            return super().make_response(data, *args, **kwargs)
        code = args[0] if args else kwargs.get("code", 200)
        headers = kwargs.get("headers") or (args[1] if len(args) > 1 else None)
        # What RESTX's output_json writes (json.dumps, a final newline), without the detours.
        resp = app.response_class(json.dumps(data) + "\n", status=code, content_type=_JSON)
        if headers:
            resp.headers.extend(headers)
        return resp
