"""Strict parsers for human-written values: each refusal is an InvalidRequest naming the field."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from api.scopes import ADMIN, ALL_SCOPES, DATA_READ, METRICS_READ, SCOPES, SECRET_READ
from keys.exc import InvalidRequest
from keys.parse import (
    DURATION_PATTERN,
    MAX_DURATION,
    NAME_PATTERN,
    NETWORK_PATTERN,
    RATE_LIMIT_PATTERN,
    RateLimit,
    format_duration,
    parse_duration,
    parse_name,
    parse_network,
    parse_networks,
    parse_rate_limit,
)

# The service's vocabulary (the library has none of its own: tests/test_library.py).
parse_scopes, grants = SCOPES.parse, SCOPES.grants


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
    ("300", 300), ("10", 10), (" 90 ", 90),  # no unit: seconds
])
def test_durations(text, seconds):
    assert parse_duration(text, "expires_in") == seconds


@pytest.mark.parametrize("text", [
    "0s", "0d", "0", "-1m", "+1m", "-10", "1.5h", "1.5", "", "  ", "h", "1w", "1y", "1H", "1 h", "1hh", "1h30m",
    "１h", "1\x00h", "1h\x00", "\x00", "٣h", "1ｈ",
    "99999999999999999999d", "9999999999s", "36501d", "999999999d",
    "0x10s", "1e3s", "1_000s", "Infinity", "NaN",
    "090s", "00s", "01d",  # leading zeros: openapi.yaml's pattern can then say exactly what is taken
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
    "010/minute", "00/second",
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
    ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
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
    # issue 12: whitespace anywhere, and IPv6 zone ids, which ipaddress reads as part of one entry
    " 10.0.0.0/8 ", "10.0.0.0/8\n", "::%x 0.0.0.0/0", "::%x 10.0.0.1/128", "fe80::1%eth0", "::1%1/128",
    "10.0.0.0/8 10.0.0.0/8",
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
    "admin\u202egnp.exe", "a\u200bb", "\ufeffkey", "a\xa0b", "a\ud800b",  # invisible, or not text at all
])
def test_bad_names_name_the_field(given):
    refused(parse_name, given, "name")


# -- the patterns openapi.yaml states are exactly what the parsers take (issue 12) ---------


# Strings near the edges of each grammar: digits, units, every strip()-able space, the
# characters a name may not hold, and whatever else Hypothesis draws.
_EDGES = st.sampled_from(list("0123456789smhd/ \t\n\x0b\x1c\x85\xa0\u2000\u2028\u3000x:.%"
                              "\x00\x7f\xad\u200b\u202e\ufeffabcdef")
                         + ["second", "minute", "hour", "day", "36500", "876000", "52560000", "999999999"])
EDGY_TEXT = st.one_of(st.lists(_EDGES, max_size=8).map("".join), st.text(max_size=12))


def _accepts(func, text: str) -> bool:  # noqa: ANN001
    try:
        func(text, "field")
    except InvalidRequest:
        return False
    return True


@pytest.mark.parametrize(("pattern", "func", "samples"), [
    (DURATION_PATTERN, parse_duration,
     [f"{n}{u}" for u in ("", "s", "m", "h", "d") for n in (1, 9, 10, 29999, 30000, 35999, 36000, 36499, 36500, 36501, 99999,
                                           100000, 799999, 869999, 870000, 875999, 876000, 876001,
                                           49999999, 50000000, 51999999, 52499999, 52559999, 52560000,
                                           52560001, 999999999, 1000000000)]),
    (RATE_LIMIT_PATTERN, parse_rate_limit, ["1/second", " 7 /day ", "999999999/hour", "1000000000/day"]),
    (NAME_PATTERN, parse_name, ["a", " a b ", "x" * 100, " " + "x" * 100 + "\u3000", "Zoë 🔑", "\ue000"]),
    (NETWORK_PATTERN, parse_network, ["::", "::/0", "1.2.3.4", "1.2.3.0/24", "fe80::/10"]),
], ids=["duration", "rate_limit", "name", "network"])
@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(extra=EDGY_TEXT)
def test_each_documented_pattern_is_what_its_parser_accepts(pattern, func, samples, extra):  # noqa: ANN001
    """Exactly the same strings, both ways (allowed_ips also needs a real CIDR block: its
    document adds ``format: cidr``, so for it the pattern only has to hold what is accepted)."""
    matcher = re.compile(pattern)
    for text in [*samples, extra]:
        accepted, matches = _accepts(func, text), bool(matcher.fullmatch(text))
        if func is parse_network:
            assert matches or not accepted, text
        else:
            assert accepted == matches, (text, accepted, matches)


def test_the_document_states_the_parsers_patterns():
    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "openapi.yaml").read_text())
    schemas = spec["components"]["schemas"]
    assert schemas["DurationText"]["pattern"] == DURATION_PATTERN
    assert schemas["CreateKey"]["properties"]["rate_limit"]["pattern"] == RATE_LIMIT_PATTERN
    assert schemas["CreateKey"]["properties"]["name"]["pattern"] == NAME_PATTERN
    item = schemas["CreateKey"]["properties"]["allowed_ips"]["items"]
    assert item["pattern"] == NETWORK_PATTERN and item["format"] == "cidr"
    edit = schemas["UpdateKey"]["properties"]  # PATCH validates as create does
    assert edit["rate_limit"]["pattern"] == RATE_LIMIT_PATTERN and edit["name"]["pattern"] == NAME_PATTERN
    assert edit["allowed_ips"]["items"] == item
