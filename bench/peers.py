"""The apps keygate is measured against in ``bench_http.py``, as their tutorials write them.

* ``httpauth_app``: plain Flask with Flask-HTTPAuth and one plaintext key compared
  with ``==`` — the tutorial-grade alternative keygate replaces;
* ``restx_app``: one bare Flask-RESTX route, no authentication at all — what keygate's
  own routes would cost without keys, limits or logs.

Both answer ``GET /secret`` with a body shaped like keygate's, so every server sends
about as many bytes. The key comes from ``BENCH_PEER_KEY``.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify


def _body(via: str) -> dict[str, Any]:
    return {"message": "Welcome to the secret page!",
            "caller": {"id": "peer", "name": "peer", "scopes": ["secret:read"], "via": via}}


def httpauth_app() -> Flask:
    from flask_httpauth import HTTPTokenAuth

    app = Flask("httpauth_peer")
    auth = HTTPTokenAuth(header="API-Key")
    expected = os.environ["BENCH_PEER_KEY"]

    @auth.verify_token
    def verify(token: str) -> str | None:
        return "peer" if token == expected else None

    @app.get("/secret")
    @auth.login_required
    def secret() -> Any:
        return jsonify(_body("header"))

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify(status="ok")

    return app


def restx_app() -> Flask:
    from flask_restx import Api, Resource

    app = Flask("restx_peer")
    api = Api(app)

    @api.route("/secret")
    class Secret(Resource):
        def get(self) -> dict[str, Any]:
            return _body("none")

    @api.route("/healthz")
    class Health(Resource):
        def get(self) -> dict[str, str]:
            return {"status": "ok"}

    return app
