"""Strict parsers for human-written values: each refusal is an InvalidRequest naming the field."""

from __future__ import annotations

import ipaddress

import pytest

from keys.exc import InvalidRequest
from keys.parse import (
    MAX_DURATION,
    RateLimit,
    format_duration,
    parse_duration,
    parse_name,
    parse_network,
    parse_networks,
    parse_rate_limit,
)
from keys.scopes import ADMIN, ALL_SCOPES, DATA_READ, METRICS_READ, SECRET_READ, grants, parse_scopes


def refused(func, value, field: str) -> InvalidRequest:  # noqa: ANN001
    """``func(value, field)`` raises InvalidRequest that names ``field`` (attribute and text)."""
    with pytest.raises(InvalidRequest) as info:
        func(value, field)
    err = info.value
    assert err.status == 400 and err.code == "invalid_request"
    assert err.field == field
    assert field in err.detail, err.detail
    return err


# -- durations --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("1s", 1), ("36500d", MAX_DURATION),
    ("  12h  ", 43200),  # surrounding whitespace is not part of the value
])
def test_durations(text, seconds):
    assert parse_duration(text, "expires_in") == seconds


@pytest.mark.parametrize("text", [
    "0s", "0d", "-1m", "+1m", "1.5h", "", "  ", "10", "h", "1w", "1y", "1H", "1 h", "1hh", "1h30m",
    "１h", "1\x00h", "1h\x00", "\x00", "٣h", "1ｈ",
    "99999999999999999999d", "9999999999s", "36501d", "999999999d",
    "0x10s", "1e3s", "1_000s", "Infinity", "NaN",
])
def test_bad_durations_name_the_field(text):
    refused(parse_duration, text, "expires_in")


@pytest.mark.parametrize("value", [None, 90, 1.5, b"90s", ["90s"]])
def test_non_string_durations(value):
    refused(parse_duration, value, "ttl")


def test_duration_error_echoes_only_a_bounded_prefix_of_huge_input():
    err = refused(parse_duration, "9" * 100_000 + "s", "grace")
    assert len(err.detail) < 300


@pytest.mark.parametrize("seconds", [1, 59, 60, 90, 3600, 5400, 86400, 30 * 86400, MAX_DURATION])
def test_format_duration_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


# -- rate limits ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "amount", "unit", "period"), [
    ("100/minute", 100, "minute", 60), ("10/second", 10, "second", 1), ("5000/day", 5000, "day", 86400),
    ("1/hour", 1, "hour", 3600), (" 100 / minute ", 100, "minute", 60),
])
def test_rate_limits(text, amount, unit, period):
    limit = parse_rate_limit(text, "rate_limit")
    assert limit == RateLimit(amount, unit)
    assert limit.period == period
    assert str(limit) == f"{amount}/{unit}"
    assert parse_rate_limit(str(limit)) == limit  # canonical text parses back


@pytest.mark.parametrize("text", [
    "", " ", "100", "/minute", "100/", "0/minute", "-1/second", "1.5/second", "100/minutes", "100/Minute",
    "100/min", "100/week", "100 per minute", "１00/minute", "100/minute\x00", "9999999999/second",
    "100/minute/2", "100//minute",
])
def test_bad_rate_limits_name_the_field(text):
    refused(parse_rate_limit, text, "rate_limit")


def test_non_string_rate_limit():
    refused(parse_rate_limit, 100, "rate_limit")


# -- CIDR blocks ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "canonical"), [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("192.168.1.0/24", "192.168.1.0/24"),
    ("10.0.0.1", "10.0.0.1/32"),
    ("10.0.0.1/32", "10.0.0.1/32"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:DB8:0::/32", "2001:db8::/32"),
    ("::1", "::1/128"),
    ("::/0", "::/0"),
    (" 10.0.0.0/8 ", "10.0.0.0/8"),
])
def test_networks(text, canonical):
    network = parse_network(text, "allowed_ips")
    assert isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)
    assert str(network) == canonical


@pytest.mark.parametrize("text", [
    "10.0.0.1/8", "192.168.1.1/24", "2001:db8::1/32", "::1/64",  # host bits set
])
def test_host_bits_set_are_refused(text):
    err = refused(parse_network, text, "allowed_ips")
    assert "host bits" in err.detail


@pytest.mark.parametrize("text", [
    "", "   ", "10.0.0", "256.0.0.0/8", "10.0.0.0/33", "::/129", "10.0.0.0/-1", "10.0.0.0/8/8",
    "localhost", "example.com/24", "010.0.0.0/8", "１０.0.0.0/8", "10.0.0.0/8\x00", "10.0.0.0 /8",
    "10.0.0.0/255.0.0.0.0", "::ffff::/96", "*", "10.*.*.*", "' OR 1=1 --",
])
def test_junk_networks_are_refused(text):
    refused(parse_network, text, "allowed_ips")


def test_non_string_network():
    refused(parse_network, 167772160, "allowed_ips")


def test_allow_list_is_canonical_and_deduplicated_in_order():
    assert parse_networks(["2001:DB8::/32", "10.0.0.1", "10.0.0.1/32", "2001:db8::/32", "10.0.0.0/8"]) == (
        "2001:db8::/32", "10.0.0.1/32", "10.0.0.0/8")
    assert parse_networks([]) == ()


def test_allow_list_with_one_bad_entry_is_refused_whole():
    with pytest.raises(InvalidRequest) as info:
        parse_networks(["10.0.0.0/8", "10.0.0.1/8"], "allowed_ips")
    assert info.value.field == "allowed_ips"


# -- scopes -----------------------------------------------------------------------


def test_known_scopes():
    assert ALL_SCOPES == (SECRET_READ, DATA_READ, METRICS_READ, ADMIN) == (
        "secret:read", "data:read", "metrics:read", "admin")


@pytest.mark.parametrize(("given", "canonical"), [
    (["secret:read"], ("secret:read",)),
    (["admin", "secret:read"], ("secret:read", "admin")),
    (["data:read", "secret:read", "data:read", "secret:read"], ("secret:read", "data:read")),
    (("admin", "admin", "data:read", "secret:read"), ("secret:read", "data:read", "admin")),
])
def test_scopes_are_deduplicated_in_canonical_order(given, canonical):
    assert parse_scopes(given, "scopes") == canonical


@pytest.mark.parametrize("given", [
    [], ["write"], ["Admin"], ["ADMIN"], ["secret:read "], [" secret:read"], ["secret:write"], [""],
    ["secret:read", "nope"], [None], [1], ["*"], ["admin\x00"],
])
def test_bad_scopes_name_the_field(given):
    refused(parse_scopes, given, "scopes")


def test_unknown_scope_is_named_in_the_error():
    err = refused(parse_scopes, ["secret:write"], "scopes")
    assert "secret:write" in err.detail


@pytest.mark.parametrize(("held", "required", "ok"), [
    (("secret:read",), "secret:read", True),
    (("secret:read",), "data:read", False),
    (("secret:read",), "admin", False),
    (("data:read",), "data:read", True),
    (("secret:read", "data:read"), "admin", False),
    (("admin",), "secret:read", True),
    (("admin",), "data:read", True),
    (("admin",), "admin", True),
    (("admin",), "some:future-scope", True),
    ((), "secret:read", False),
])
def test_scope_rule(held, required, ok):
    assert grants(held, required) is ok


# -- names ------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "name"), [
    ("ci", "ci"), ("  billing service  ", "billing service"), ("Zoë's key 🔑", "Zoë's key 🔑"),
    ("x" * 100, "x" * 100), ("' OR 1=1 --", "' OR 1=1 --"),
])
def test_names(given, name):
    assert parse_name(given, "name") == name


@pytest.mark.parametrize("given", [
    "", "   ", "\t\n", "x" * 101, "a\x00b", "a\nb", "a\rb", "a\tb", "\x1b[31mred", "a\u2028b", None, 5, ["ci"],
])
def test_bad_names_name_the_field(given):
    refused(parse_name, given, "name")
