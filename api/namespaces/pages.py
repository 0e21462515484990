"""The protected pages: one scope each, as the contract's table says."""

from __future__ import annotations

from typing import Any

from flask import g
from flask_restx import Namespace, fields

from keys import KeyAuth

from ..restx import Resource
from ..scopes import ADMIN, DATA_READ, SECRET_READ

HEADER_ONLY = [{"apiKey": []}]
HEADER_OR_TOKEN = [{"apiKey": []}, {"token": []}]


def _body(message: str) -> dict[str, Any]:
    p = g._get_current_object().principal  # ~1 µs less than via the proxy
    return {
        "message": message,
        "caller": {"id": p.key_id, "name": p.name, "scopes": list(p.scopes), "via": p.via},
    }


def namespaces(auth: KeyAuth) -> list[Namespace]:
    secret = Namespace("secret", path="/secret", description="Needs the secret:read scope")
    data = Namespace("data", path="/data", description="Needs data:read; header or query token")
    admin = Namespace("admin", path="/admin", description="Needs the admin scope")

    caller = secret.model(
        "Caller",
        {
            "id": fields.String(description="key id"),
            "name": fields.String,
            "scopes": fields.List(fields.String),
            "via": fields.String(enum=["header", "token"]),
        },
    )
    page = secret.model("Page", {"message": fields.String, "caller": fields.Nested(caller)})
    for ns in (data, admin):
        ns.models[caller.name] = caller
        ns.models[page.name] = page

    @secret.route("")
    class Secret(Resource):
        @secret.doc(security=HEADER_ONLY)
        @secret.response(200, "Welcome", page)
        @auth.require(SECRET_READ)
        def get(self) -> dict[str, Any]:
            """The secret page."""
            return _body("Welcome to the secret page!")

    @data.route("")
    class Data(Resource):
        @data.doc(security=HEADER_OR_TOKEN)
        @data.response(200, "Data", page)
        @auth.require(DATA_READ, accept=("header", "token"))
        def get(self) -> dict[str, Any]:
            """Data, reachable with a key or a query token."""
            return _body("Here is your data.")

    @admin.route("")
    class Admin(Resource):
        @admin.doc(security=HEADER_ONLY)
        @admin.response(200, "Welcome", page)
        @auth.require(ADMIN)
        def get(self) -> dict[str, Any]:
            """The admin page."""
            return _body("Welcome, admin!")

    return [secret, data, admin]
