"""Strict parsers for the human-written values keygate accepts.

Each returns a canonical value or raises ``InvalidRequest`` naming the field,
so the CLI and the HTTP API refuse bad input with the same words.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

from .exc import InvalidRequest

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd]?)")  # no unit: seconds
MAX_DURATION = 100 * 365 * 86400  # a century: beyond that a typo is likelier than intent

_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE_RE = re.compile(r"([0-9]{1,9})\s*/\s*(second|minute|hour|day)")


def parse_duration(text: str, field: str = "duration") -> int:
    """``300`` (seconds), ``90s``, ``15m``, ``12h``, ``30d`` → seconds (a positive int)."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string like 300, 90s, 15m, 12h or 30d", field=field)
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise InvalidRequest(
            f"{field}: {text[:40]!r} is not a duration: seconds (300) or 90s, 15m, 12h, 30d", field=field
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds <= 0:
        raise InvalidRequest(f"{field} must be longer than zero", field=field)
    if seconds > MAX_DURATION:
        raise InvalidRequest(f"{field} must be at most 100 years", field=field)
    return seconds


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class RateLimit(NamedTuple):
    """A limit of ``amount`` requests per ``period`` seconds."""

    amount: int
    unit: str

    @property
    def period(self) -> int:
        return _PERIODS[self.unit]

    def __str__(self) -> str:
        return f"{self.amount}/{self.unit}"


def parse_rate_limit(text: str, field: str = "rate_limit") -> RateLimit:
    """``100/minute``, ``10/second``, ``5000/day`` → ``RateLimit``."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string like 100/minute", field=field)
    m = _RATE_RE.fullmatch(text.strip())
    if not m:
        raise InvalidRequest(
            f"{field}: {text[:40]!r} is not a rate limit like 100/minute, 10/second or 5000/day",
            field=field,
        )
    amount = int(m.group(1))
    if amount <= 0:
        raise InvalidRequest(f"{field} must allow at least one request", field=field)
    return RateLimit(amount, m.group(2))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str, field: str = "allowed_ips") -> Network:
    """A CIDR block or single address, IPv4 or IPv6. Host bits must be zero."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"{field}: expected a CIDR block such as 10.0.0.0/8", field=field)
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):  # 10.0.0.1/8: say what was probably meant
            block = ipaddress.ip_network(text.strip(), strict=False)
            address = text.strip().partition("/")[0]
            raise InvalidRequest(f"{field}: {text[:50]!r} has host bits set: write the block as {block} "
                                 f"or the one address as {address}", field=field) from None
        raise InvalidRequest(f"{field}: {text[:50]!r} is not a valid CIDR block ({e})", field=field) from None


def parse_networks(values: Iterable[str], field: str = "allowed_ips") -> tuple[str, ...]:
    """Validate an allow-list and return its canonical, de-duplicated text form."""
    out: list[str] = []
    for value in values:
        canonical = str(parse_network(value, field))
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


def parse_name(text: object, field: str = "name") -> str:
    """A key's label: 1–100 printable characters."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    name = text.strip()
    if not name:
        raise InvalidRequest(f"{field} must not be empty", field=field)
    if len(name) > 100:
        raise InvalidRequest(f"{field} must be at most 100 characters", field=field)
    if not name.isprintable():
        raise InvalidRequest(f"{field} must not contain control characters", field=field)
    return name
