"""POST /tokens: mint a short-lived query token from the calling key."""

from __future__ import annotations

from typing import Any

from flask import g
from flask_restx import Namespace, fields

from keys import KeyAuth
from keys.model import isoformat
from keys.tokens import TokenSigner, mint_token

from ..bodies import json_body, seconds, string_list
from ..restx import Resource


def namespace(auth: KeyAuth, signer: TokenSigner) -> Namespace:
    ns = Namespace("tokens", path="/tokens", description="Query tokens for places a header can't go")
    token_request = ns.model("TokenRequest", {
        "scopes": fields.List(fields.String, description="subset of the key's scopes (default: all)"),
        "ttl": fields.Raw(description="lifetime in seconds or a duration like 15m (default 900 s, at most "
                          "KEYGATE_TOKEN_MAX_TTL)"),
    })
    token_response = ns.model("Token", {
        "token": fields.String,
        "expires_at": fields.String(description="ISO 8601 UTC"),
        "scopes": fields.List(fields.String),
    })

    @ns.route("")
    class Tokens(Resource):
        @ns.doc(security=[{"apiKey": []}])
        @ns.expect(token_request, validate=False)
        @ns.response(201, "Minted", token_response)
        @auth.require(None)
        def post(self) -> tuple[dict[str, Any], int]:
            """Mint a query token, narrowed to some of the key's scopes."""
            body = json_body({"scopes", "ttl"})
            scopes = string_list(body["scopes"], "scopes") if body.get("scopes") is not None else None
            minted = mint_token(
                auth.store, signer, g.principal.record, actor=f"key:{g.principal.key_id}",
                scopes=scopes, ttl=seconds(body.get("ttl"), "ttl"),
            )
            return {"token": minted.token, "expires_at": isoformat(minted.expires_at),
                    "scopes": list(minted.scopes)}, 201

    return ns
