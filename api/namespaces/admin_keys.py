"""The key-management API under /admin/keys and the audit read-out at /admin/audit."""

from __future__ import annotations

import time
from typing import Any

from flask import Response, current_app, g, request
from flask_restx import Namespace, fields

from keys import KeyAuth, KeyRecord, get_key, issue_key, revoke_key
from keys.exc import InvalidRequest
from keys.history import usage_series
from keys.issuing import EDITABLE, rotate_key, update_key
from keys.keyformat import is_key_id
from keys.model import isoformat
from keys.usage import UsageRecorder

from ..bodies import int_arg, json_body, optional_string, seconds, string_list, time_arg
from ..restx import Resource
from ..scopes import ADMIN, SCOPES

ADMIN_ONLY = [{"apiKey": []}]


def _actor() -> str:
    return f"key:{g.principal.key_id}"


def _metadata(record: KeyRecord) -> dict[str, Any]:
    """A key's metadata as the API shows it: its state now, and the limit in force."""
    return record.metadata(default_rate_limit=current_app.extensions["keygate.settings"].default_rate_limit)


def edits_from_json(body: dict[str, Any]) -> dict[str, Any]:
    """A PATCH body's fields in ``update_key``'s terms: JSON types checked, durations in seconds
    (``null`` clears: no expiry, the default limit, any address)."""
    edits: dict[str, Any] = {}
    for name, value in body.items():
        if name in ("scopes", "allowed_ips") and value is not None:
            value = string_list(value, name)
        elif name == "rate_limit":
            value = optional_string(value, name)
        elif name == "expires_in":
            value = seconds(value, name)
        edits[name] = value
    return edits


#: How far back a usage series reaches when ``from`` is not given, per interval.
DEFAULT_SPAN = {"hour": 86400, "day": 30 * 86400}


def usage_report(store: Any, key_id: str) -> dict[str, Any]:
    """``GET /admin/keys/<id>/usage``'s body, from the query's ``from``, ``to`` and ``interval``."""
    get_key(store, key_id)  # 404 for an unknown key, before anything else
    interval = request.args.get("interval", "hour")
    if interval not in DEFAULT_SPAN:
        raise InvalidRequest("interval must be hour or day", field="interval")
    until = time_arg("to", time.time())
    since = time_arg("from", until - DEFAULT_SPAN[interval])
    buckets = usage_series(store, key_id, since, until, interval)
    totals = {name: sum(getattr(b, name) for b in buckets) for name in ("accepted", "refused_limit", "refused_scope")}
    return {"key_id": key_id, "interval": interval, "from": isoformat(buckets[0].start),
            "to": isoformat(buckets[-1].start), "buckets": [b.as_dict() for b in buckets], "totals": totals}


def _forget_cached_keys(auth: KeyAuth) -> None:
    """A revocation or rotation made here takes effect here at once, not after the
    verification cache's staleness bound (other processes still wait for it)."""
    clear = getattr(auth.lookup, "clear", None)
    if clear is not None:
        clear()


def namespaces(auth: KeyAuth, usage: UsageRecorder | None = None) -> list[Namespace]:
    ns = Namespace("admin-keys", path="/admin/keys", description="Manage keys (admin scope)")
    audit_ns = Namespace("admin-audit", path="/admin/audit", description="Audit trail (admin scope)")
    store = auth.store

    metadata = ns.model("KeyMetadata", {
        "id": fields.String, "name": fields.String, "scopes": fields.List(fields.String),
        "state": fields.String(enum=["active", "grace", "revoked", "expired"]),
        "created_at": fields.String, "expires_at": fields.String, "revoked_at": fields.String,
        "last_used_at": fields.String, "use_count": fields.Integer, "rate_limit": fields.String,
        "allowed_ips": fields.List(fields.String), "replaces": fields.String,
    })
    new_key = ns.inherit("NewKey", metadata, {"key": fields.String(description="shown only once")})
    create_request = ns.model("CreateKey", {
        "name": fields.String(required=True),
        "scopes": fields.List(fields.String, required=True),
        "expires_in": fields.String(description="seconds, or a duration like 30d"),
        "rate_limit": fields.String(description="e.g. 100/minute"),
        "allowed_ips": fields.List(fields.String, description="CIDR blocks"),
    })
    rotate_request = ns.model("RotateKey", {"grace": fields.String(description="e.g. 1h; default: stop now")})
    update_request = ns.model("UpdateKey", {
        "name": fields.String,
        "scopes": fields.List(fields.String),
        "expires_in": fields.String(description="seconds, or a duration like 30d, from now; null: never"),
        "rate_limit": fields.String(description="e.g. 100/minute; null: the default"),
        "allowed_ips": fields.List(fields.String, description="CIDR blocks; null or []: anywhere"),
    })

    @ns.route("")
    class Keys(Resource):
        @ns.doc(security=ADMIN_ONLY, params={
            "limit": "page size, 1-1000 (default 100)", "after": "the `next` of the previous page"})
        @auth.require(ADMIN)
        def get(self) -> dict[str, Any]:
            """List keys' metadata, a page at a time."""
            limit = int_arg("limit", 100, 1, 1000)
            after = request.args.get("after")
            if after is not None and not is_key_id(after):
                raise InvalidRequest("after must be a key id", field="after")
            page = store.list_keys(limit=limit, after=after)
            return {"keys": [_metadata(r) for r in page],
                    "next": page[-1].id if len(page) == limit else None}

        @ns.doc(security=ADMIN_ONLY)
        @ns.expect(create_request, validate=False)
        @ns.response(201, "Created; the key is shown only in this response", new_key)
        @auth.require(ADMIN)
        def post(self) -> tuple[dict[str, Any], int, dict[str, str]]:
            """Create a key."""
            body = json_body({"name", "scopes", "expires_in", "rate_limit", "allowed_ips"},
                             required=frozenset({"name", "scopes"}))
            issued = issue_key(
                store,
                name=body["name"],
                scopes=string_list(body["scopes"], "scopes"),
                expires_in=seconds(body.get("expires_in"), "expires_in"),
                rate_limit=optional_string(body.get("rate_limit"), "rate_limit"),
                # `or []` would take {}, "" or false for "anywhere": only null (or omitted) means that.
                allowed_ips=string_list(body["allowed_ips"], "allowed_ips")
                if body.get("allowed_ips") is not None else [],
                actor=_actor(),
                vocabulary=SCOPES,
            )
            return ({**_metadata(issued.record), "key": issued.plaintext}, 201,
                    {"Location": f"/admin/keys/{issued.record.id}"})

    @ns.route("/<string:key_id>")
    class Key(Resource):
        @ns.doc(security=ADMIN_ONLY)
        @ns.response(200, "Metadata", metadata)
        @auth.require(ADMIN)
        def get(self, key_id: str) -> dict[str, Any]:
            """One key's metadata."""
            return _metadata(get_key(store, key_id))

        @ns.doc(security=ADMIN_ONLY)
        @ns.expect(update_request, validate=False)
        @ns.response(200, "Edited", metadata)
        @auth.require(ADMIN)
        def patch(self, key_id: str) -> dict[str, Any]:
            """Edit a key in place (no rotation); 409 on a revoked key."""
            edits = edits_from_json(json_body(set(EDITABLE)))
            record = update_key(store, key_id, edits, actor=_actor(), vocabulary=SCOPES)
            _forget_cached_keys(auth)
            return _metadata(record)

        @ns.doc(security=ADMIN_ONLY)
        @ns.response(204, "Revoked (repeating it is harmless)")
        @auth.require(ADMIN)
        def delete(self, key_id: str) -> Response:
            """Revoke a key now; its query tokens die with it."""
            revoke_key(store, key_id, actor=_actor())
            _forget_cached_keys(auth)
            return current_app.response_class(status=204)

    @ns.route("/<string:key_id>/rotate")
    class Rotate(Resource):
        @ns.doc(security=ADMIN_ONLY)
        @ns.expect(rotate_request, validate=False)
        @ns.response(201, "The new key, shown only in this response", new_key)
        @auth.require(ADMIN)
        def post(self, key_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
            """Replace a key; the old one stops now or after `grace`."""
            body = json_body({"grace"})
            grace = seconds(body.get("grace"), "grace")
            issued = rotate_key(store, key_id, grace=grace, actor=_actor())
            _forget_cached_keys(auth)
            return ({**_metadata(issued.record), "key": issued.plaintext}, 201,
                    {"Location": f"/admin/keys/{issued.record.id}"})

    @ns.route("/<string:key_id>/usage")
    class Usage(Resource):
        @ns.doc(security=ADMIN_ONLY, params={
            "from": "ISO 8601 time or date (default: a day, or 30 days, before `to`)",
            "to": "ISO 8601 time or date (default: now)", "interval": "hour (default) or day"})
        @auth.require(ADMIN)
        def get(self, key_id: str) -> dict[str, Any]:
            """Requests per hour or day: accepted, refused by the key's limit, refused by scope."""
            return usage_report(store, key_id)

    @audit_ns.route("")
    class Audit(Resource):
        @audit_ns.doc(security=ADMIN_ONLY, params={
            "key_id": "only this key's events", "limit": "1-1000 (default 100)",
            "before": "the `next` of the previous page"})
        @auth.require(ADMIN)
        def get(self) -> dict[str, Any]:
            """Lifecycle events, newest first, and authentication failures per code."""
            limit = int_arg("limit", 100, 1, 1000)
            before = int_arg("before", 0, 1, 2**62) or None
            key_id = request.args.get("key_id")
            if key_id is not None and not is_key_id(key_id):
                raise InvalidRequest("key_id must be a key id", field="key_id")
            events = store.events(key_id=key_id, limit=limit, before=before)
            failures = store.auth_failures()
            if usage is not None:  # this process's not-yet-flushed counts
                for code, n in usage.pending_failures().items():
                    failures[code] = failures.get(code, 0) + n
            return {"events": [e.as_dict() for e in events],
                    "next": events[-1].id if len(events) == limit else None,
                    "auth_failures": failures}

    return [ns, audit_ns]
