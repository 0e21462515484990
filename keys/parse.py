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

# The patterns below are what openapi.yaml states for these fields, character for character
# (tests/test_parse.py holds each against its parser), so a client that validates against the
# document sends only what the server accepts. WS is exactly what str.strip() removes.
WS = r"[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
#: A duration: a number without leading zeros and a unit (none: seconds), more than zero,
#: at most 100 years.
DURATION_PATTERN = (
    rf"^{WS}*(?:[1-9][0-9]{{0,8}}s?"  # plain digits: seconds
    r"|(?:[1-9][0-9]{0,6}|[1-4][0-9]{7}|5[01][0-9]{6}|52[0-4][0-9]{5}|525[0-5][0-9]{4}|52560000)m"
    r"|(?:[1-9][0-9]{0,4}|[1-7][0-9]{5}|8[0-6][0-9]{4}|87[0-5][0-9]{3}|876000)h"
    rf"|(?:[1-9][0-9]{{0,3}}|[12][0-9]{{4}}|3[0-5][0-9]{{3}}|36[0-4][0-9]{{2}}|36500)d){WS}*$"
)
#: A rate limit: at least one request per second, minute, hour or day.
RATE_LIMIT_PATTERN = rf"^{WS}*[1-9][0-9]{{0,8}}{WS}*/{WS}*(?:second|minute|hour|day){WS}*$"
# What a name may not contain: control characters, whitespace other than the space, and the
# invisible ones that make a name display as something else (zero-width, bidi overrides, BOM).
# (Lone surrogates, which JSON's \ud800 escapes can make, are not text: refused apart, as
# validators working on Unicode scalar values can't compile a pattern that names them.)
_NAME_CHAR = (r"[^\x00-\x20\x7f-\xa0\xad\u1680\u2000-\u200f\u2028-\u202f\u205f-\u2064"
              r"\u2066-\u206f\u3000\ufeff]")
#: A key's name: 1-100 such characters once surrounding whitespace is trimmed; spaces inside.
NAME_PATTERN = rf"^{WS}*{_NAME_CHAR}(?:(?:{_NAME_CHAR}| ){{0,98}}{_NAME_CHAR})?{WS}*$"
#: The characters of an address or CIDR block: no whitespace, no IPv6 zone id (``%eth0``).
NETWORK_PATTERN = r"^[0-9A-Fa-f:.]{2,45}(?:/[0-9]{1,3})?$"
_NAME_RE = re.compile(NAME_PATTERN)
_NETWORK_RE = re.compile(NETWORK_PATTERN)


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
    if m.group(1).startswith("0"):
        raise InvalidRequest(f"{field}: {text[:40]!r} has a leading zero; write it like 90s", field=field)
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
    if m.group(1).startswith("0"):
        raise InvalidRequest(f"{field}: {text[:40]!r} has a leading zero; write it like 100/minute",
                             field=field)
    return RateLimit(amount, m.group(2))


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str, field: str = "allowed_ips") -> Network:
    """A CIDR block or single address, IPv4 or IPv6. Host bits must be zero."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest(f"{field}: expected a CIDR block such as 10.0.0.0/8", field=field)
    # ipaddress takes anything after a "%" as an IPv6 zone id, spaces included: "::%x 0.0.0.0/0"
    # would be one "valid" entry. Only address characters, so nothing can be smuggled in.
    if not _NETWORK_RE.fullmatch(text):
        raise InvalidRequest(
            f"{field}: {text[:50]!r} is not a CIDR block such as 10.0.0.0/8 "
            "(digits, hex letters, ':', '.' and one '/prefix'; no spaces, no zone ids)", field=field)
    try:
        return ipaddress.ip_network(text, strict=True)
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


def _is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (no UTF-8 encoding: no store could keep it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_name(text: object, field: str = "name") -> str:
    """A key's label: 1–100 printable characters."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string", field=field)
    name = text.strip()
    if not name:
        raise InvalidRequest(f"{field} must not be empty", field=field)
    if len(name) > 100:
        raise InvalidRequest(f"{field} must be at most 100 characters", field=field)
    if not _NAME_RE.fullmatch(text) or not _is_text(text):
        raise InvalidRequest(f"{field} must not contain control, invisible or line-breaking characters",
                             field=field)
    return name
