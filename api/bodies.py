"""Strict reading of request bodies and query arguments: 400 naming the field."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from flask import request

from keys.exc import InvalidRequest, PayloadTooLarge
from keys.parse import MAX_DURATION, parse_duration

MAX_BODY = 64 * 1024


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: ``{"scopes": [...], "scopes": ["admin"]}`` is refused, not read as
    its last value (what a validating proxy in front saw may be the first)."""
    data: dict[str, Any] = {}
    for name, value in pairs:
        if name in data:
            raise InvalidRequest(f"duplicate field {name[:40]!r}", field=name[:40])
        data[name] = value
    return data


def json_body(allowed: set[str], required: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The JSON object body; none at all means ``{}``. Unknown fields are refused, so a
    typo (``scope`` for ``scopes``) is an error rather than silently ignored."""
    if request.content_length and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"body must be at most {MAX_BODY} bytes")
    # A chunked body has no Content-Length: read one byte past the limit, never the rest.
    raw = request.stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"body must be at most {MAX_BODY} bytes")
    if not raw:  # no body; whitespace alone (or \v, which bytes.strip() also took) is not JSON
        data: Any = {}
    else:
        try:
            data = json.loads(raw, object_pairs_hook=_refuse_duplicates)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting ([[[[…)
            raise InvalidRequest("body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest("body must be a JSON object", field="body")
    for name in sorted(set(data) - allowed):
        raise InvalidRequest(f"unknown field {name[:40]!r}; allowed: {', '.join(sorted(allowed))}", field=name[:40])
    for name in sorted(required - set(data)):
        raise InvalidRequest(f"{name} is required", field=name)
    return data


def string_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{field} must be an array of strings", field=field)
    return value


def optional_string(value: Any, field: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    return value


def seconds(value: Any, field: str) -> int | None:
    """A duration as whole seconds (``3600``) or text (``"1h"``); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_duration(value, field)
    return whole_seconds(value, field)


def whole_seconds(value: Any, field: str) -> int:
    """A positive whole number of seconds; ``60.0`` is JSON's way of writing 60 too."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be a whole number of seconds or a duration like 30d", field=field)
    if value <= 0:
        raise InvalidRequest(f"{field} must be longer than zero", field=field)
    if value > MAX_DURATION:
        raise InvalidRequest(f"{field} must be at most {MAX_DURATION} seconds (100 years)", field=field)
    return value


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise InvalidRequest(f"{name} must be a whole number from {low} to {high}", field=name)
    return int(raw)


def time_arg(name: str, default: float) -> float:
    """An ISO 8601 time (``2026-05-01T13:00:00Z``) or date (``2026-05-01``), UTC unless it
    says otherwise, as epoch seconds; ``default`` when the argument is absent."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        if len(raw) > 40:
            raise ValueError
        when = datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 time like 2026-05-01T13:00:00Z or a date",
                             field=name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        raise InvalidRequest(f"{name} is out of range", field=name) from None
