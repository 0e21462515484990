"""``keys.redact``: what the access log scrubs, and that scrubbing can't be made slow."""

from __future__ import annotations

import time

import pytest

from keys import generate_key, issue_key, open_store
from keys.redact import REDACTED, redact, redact_query
from keys.tokens import TokenSigner


@pytest.fixture(scope="module")
def token() -> str:
    store = open_store("memory://")
    record = issue_key(store, name="r", scopes=["data:read", "secret:read"]).record
    return TokenSigner(["s" * 32]).mint(record).token


def test_query_credentials_are_redacted(token):
    key = generate_key().plaintext
    assert redact(f"GET /data?token={token}&x=1 HTTP/1.1") == f"GET /data?token={REDACTED}&x=1 HTTP/1.1"
    assert redact(f"/data?x=1&api_key={key}") == f"/data?x=1&api_key={REDACTED}"
    assert redact_query(f"token={token}") == f"token={REDACTED}"
    assert redact_query("") == "" and redact("") == ""


@pytest.mark.parametrize("template", ["{}", "see {} here", "https://x.example/y#{}", '"{}"', "({})"])
def test_bare_keys_and_tokens_are_redacted_wherever_they_appear(token, template):
    key = generate_key().plaintext
    for value in (key, token):
        out = redact(template.format(value))
        assert value not in out and REDACTED in out
        assert out == template.format(REDACTED)


def test_ordinary_text_is_left_alone():
    for text in ["GET /secret HTTP/1.1", "1.2.3.4 - - [29/Nov/2026]", "a.b.c.d.e", "v1.2.3.4.5",
                 "abcdefghijkl.1.2.3.4", "kg_short"]:
        assert redact(text) == text


@pytest.mark.parametrize("evil", [
    "a" * 200_000,
    ("a" * 12 + ".1.1.-") * 11_000,
    "kg_" * 70_000,
    "?token=&" * 25_000,
    ("a" * 12 + ".1.1." + "b" * 60 + ".") * 2_500,
])
def test_redaction_time_grows_linearly_with_hostile_input(evil):
    """Log lines carry attacker-chosen text (URLs, Referer, up to 16 KB a header): a pattern
    that backtracks quadratically would turn one request into seconds of CPU. 200 KB in
    well under a second (linear: milliseconds; quadratic was ~20 s) — a 100× margin."""
    started = time.perf_counter()
    redact(evil)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("name", ["%74oken", "tok%65n", "TOKEN", "%54%4F%4B%45%4E", "api%5Fkey", "Api-Key", "key"])
def test_a_credential_parameter_is_redacted_however_its_name_is_encoded(token, name):
    """werkzeug decodes ``%74oken`` to ``token``, so the server accepts it: the log must too."""
    out = redact_query(f"{name}={token}&page=2")
    assert out == f"{name}={REDACTED}&page=2"
    assert redact(f"GET /data?{name}={token} HTTP/1.1") == f"GET /data?{name}={REDACTED} HTTP/1.1"


def test_a_percent_encoded_key_or_token_is_redacted_under_any_name(token):
    key = generate_key().plaintext
    encoded_key = "%6B%67_" + key[3:]  # kg_…
    encoded_token = token.replace(".", "%2E")
    assert redact_query(f"next={encoded_key}&page=2") == f"next={REDACTED}&page=2"
    assert redact_query(f"q={encoded_token}") == f"q={REDACTED}"
    assert redact_query("page=2&sort=name") == "page=2&sort=name"
