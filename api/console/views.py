"""What the dashboard's and the management pages' views share: a key's facts, its usage
chart and table, and reading their forms."""

from __future__ import annotations

import time
from typing import Any

from flask import request

from keys.exc import InvalidRequest
from keys.history import usage_series
from keys.model import KeyRecord
from keys.parse import parse_duration

from .charts import bucket_label, usage_chart
from .guard import console

#: How far back a chart reaches, per interval.
SPANS = {"hour": 24 * 3600, "day": 30 * 86400}
#: Grace periods offered when rotating (seconds; 0: the old key stops now).
GRACE_CHOICES = (("0", "none: the old key stops now"), ("900", "15 minutes"), ("3600", "1 hour"),
                 ("86400", "1 day"), ("604800", "7 days"))
#: Query-token lifetimes offered (seconds), up to KEYGATE_TOKEN_MAX_TTL.
TTL_CHOICES = ((900, "15 minutes"), (3600, "1 hour"), (86400, "24 hours"))


def facts(key: KeyRecord) -> dict[str, Any]:
    """A key as its pages show it: its metadata, its state, the limit in force."""
    return {**key.metadata(), "limit": key.rate_limit or str(console().limits.default)}


def usage(key: KeyRecord) -> dict[str, Any]:
    """The chart and the table of a key's requests (``?interval=hour|day``)."""
    interval = request.args.get("interval", "hour")
    if interval not in SPANS:
        interval = "hour"
    now = time.time()
    buckets = usage_series(console().auth.store, key.id, now - SPANS[interval] + 1, now, interval)
    title = "Requests per hour, last 24 hours" if interval == "hour" else "Requests per day, last 30 days"
    return {"interval": interval, "buckets": buckets, "title": title, "label": bucket_label,
            "chart": usage_chart(buckets, interval, title),
            "totals": {name: sum(getattr(b, name) for b in buckets)
                       for name in ("accepted", "refused_limit", "refused_scope")}}


def form_duration(name: str, label: str) -> int | None:
    raw = request.form.get(name, "").strip()
    return None if not raw else parse_duration(raw, label)


def form_choice(name: str, choices: tuple[tuple[Any, str], ...]) -> int:
    raw = request.form.get(name, "")
    allowed = {str(value) for value, _ in choices}
    if raw not in allowed:
        raise InvalidRequest(f"{name}: choose one of the offered values", field=name)
    return int(raw)


def form_networks(name: str = "allowed_ips") -> list[str]:
    """An allow-list typed into a textarea: CIDR blocks separated by spaces, commas or lines."""
    return request.form.get(name, "").replace(",", " ").split()
