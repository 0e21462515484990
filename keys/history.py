"""Usage over time: a key's hourly counts as a gapless series of hour or day buckets."""

from __future__ import annotations

from .exc import InvalidRequest
from .model import UsageBucket
from .store.base import KeyStore

#: Bucket sizes a series can have, in seconds.
INTERVALS = {"hour": 3600, "day": 86400}
#: The most buckets one series may have: 100 days of hours, or 2,400 days.
MAX_BUCKETS = 2400


def usage_series(store: KeyStore, key_id: str, since: float, until: float,
                 interval: str = "hour") -> list[UsageBucket]:
    """Every ``interval`` bucket (UTC) from the one holding ``since`` to the one holding
    ``until``, oldest first, zeros included, so a chart and a table get one row per period."""
    size = INTERVALS.get(interval)
    if size is None:
        raise InvalidRequest(f"interval must be one of {', '.join(INTERVALS)}", field="interval")
    if until < since:
        raise InvalidRequest("from must not be later than to", field="from")
    first, last = int(since // size) * size, int(until // size) * size
    if (last - first) // size + 1 > MAX_BUCKETS:
        raise InvalidRequest(f"at most {MAX_BUCKETS} {interval}s at once; narrow from and to", field="from")
    totals = {start: [0, 0, 0] for start in range(first, last + size, size)}
    for hour in store.usage(key_id, first, last + size):
        row = totals[int(hour.start // size) * size]
        row[0] += hour.accepted
        row[1] += hour.refused_limit
        row[2] += hour.refused_scope
    return [UsageBucket(float(start), *counts) for start, counts in totals.items()]
