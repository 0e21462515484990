"""The throttle of refused credentials (issue 12, item 4), as an attacker and a client see it.

* the limiter steps it stands on (``peek``, ``hit_unless``), one suite over every backend,
  the same answers everywhere;
* the HTTP surface through the Flask test client: 30 guesses a minute per client address,
  then 429 ``auth_throttled`` for every credential from it — a good key too — whatever the
  check would have found; what counts and what doesn't; other addresses, proxies, IPv6;
* a real server with two workers: exact across them;
* one Redis round trip per authenticated request with the throttle on (issue 17, item 4).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from api.config import load_settings
from api.ratelimits import client_address
from conftest import invoke_cli, wait_for_workers
from keys import ConfigError, issue_key, open_store, revoke_key
from keys.parse import RateLimit
from keys.ratelimit import Counter
from keys.ratelimit_redis import RedisLimiter
from test_observability import value
from test_ratelimit_redis import T0, backends, commands_during, private_redis  # noqa: F401  (fixtures)

GUESS = {"API-Key": "kg_" + "A" * 50}  # well-formed enough to be checked, and wrong
MINUTE = RateLimit(30, "minute")


def scrape(client, key: str, **kw) -> str:  # noqa: ANN001, ANN003
    resp = client.get("/metrics", headers={"API-Key": key}, **kw)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_data(as_text=True)


# ---------------------------------------------------------------------------------------
# The steps, on every backend
# ---------------------------------------------------------------------------------------


def test_a_peek_counts_nothing_and_answers_as_a_hit_would(backends):  # noqa: F811
    limit = RateLimit(3, "minute")
    answers = {}
    for label, lim in backends.items():
        seen = [lim.peek("peeked00001", limit, now=T0) for _ in range(5)]  # five peeks: nothing spent
        seen += [lim.hit("peeked00001", limit, now=T0 + 1) for _ in range(3)]
        seen += [lim.peek("peeked00001", limit, now=T0 + 2), lim.hit("peeked00001", limit, now=T0 + 2)]
        answers[label] = seen
    expected = answers["shared-memory"]
    assert all(got == expected for got in answers.values()), answers
    assert [s.allowed for s in expected] == [True] * 8 + [False, False]
    assert expected[0].remaining == 2 and expected[4].remaining == 2  # as a hit would say, each time
    assert expected[8] == expected[9]  # the refused peek says what the refused hit says: Retry-After too
    assert expected[8].retry_after == 19


def test_hit_unless_counts_the_hit_only_while_the_guard_has_room(backends):  # noqa: F811
    key_limit = RateLimit(5, "minute")
    guard = Counter("192.0.2.7", RateLimit(2, "minute"), "authfail")
    answers = {}
    for label, lim in backends.items():
        steps = [lim.hit_unless("guardedkey01", key_limit, guard, now=T0)]
        steps += [lim.hit(guard.name, guard.limit, now=T0, namespace=guard.namespace) for _ in range(2)]
        steps += [lim.hit_unless("guardedkey01", key_limit, guard, now=T0 + 1)]  # the guard is spent
        steps += [lim.hit("guardedkey01", key_limit, now=T0 + 1)]  # the refused one was not counted
        steps += [lim.hit_unless("guardedkey01", key_limit, guard, now=T0 + 31)]  # one guess back: room
        answers[label] = steps
    expected = answers["shared-memory"]
    assert all(got == expected for got in answers.values()), answers
    (unthrottled, first), _, _, (spent, nothing), second, (unthrottled_later, third) = expected
    assert unthrottled is None and first is not None and first.allowed and first.remaining == 4
    assert spent is not None and not spent.allowed and nothing is None and spent.retry_after == 29
    assert second.remaining == 3  # one counted before, one now: never the refused one
    assert unthrottled_later is None and third is not None and third.allowed
    # The guard was only ever peeked by hit_unless: still one guess of room, not zero.
    lim = backends["memory"]
    assert lim.hit(guard.name, guard.limit, now=T0 + 31, namespace=guard.namespace).allowed


@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_with_the_throttle_an_authenticated_request_is_still_one_evalsha(private_redis):  # noqa: F811
    lim = RedisLimiter(private_redis.url, prefix="kg:")
    guard = Counter("192.0.2.7", MINUTE, "authfail")
    lim.hit_unless("warmup000001", RateLimit(1000, "minute"), guard)  # loads the script
    seen = commands_during(private_redis, lambda: [
        lim.hit_unless(f"roundtrip{i:03d}", RateLimit(1000, "minute"), guard) for i in range(50)])
    assert seen == ["EVALSHA"] * 50
    lim.close()


# ---------------------------------------------------------------------------------------
# Through the app
# ---------------------------------------------------------------------------------------


@pytest.fixture
def setup(make_app):  # noqa: ANN001, ANN201
    """``setup(**config)`` → (client, store, good key's headers): a memory store, a fresh app."""
    def make(**config):  # noqa: ANN202
        store = open_store("memory://")
        store.migrate()
        app = make_app(store, **config)
        good = issue_key(store, name="good", scopes=["secret:read", "data:read"]).plaintext
        return app.test_client(), store, {"API-Key": good}
    return make


def assert_throttled(resp, retry_after: int | None = None) -> None:  # noqa: ANN001
    assert resp.status_code == 429, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.get_json(force=True)
    assert body["code"] == "auth_throttled" and body["status"] == 429
    assert int(resp.headers["Retry-After"]) >= 1
    if retry_after is not None:
        assert resp.headers["Retry-After"] == str(retry_after)
    assert resp.headers["Cache-Control"] == "no-store"
    assert "RateLimit" not in resp.headers  # no key was counted


def test_thirty_guesses_a_minute_then_every_credential_is_429_even_a_good_one(setup):
    client, store, good = setup()
    statuses = [client.get("/secret", headers=GUESS).status_code for _ in range(30)]
    assert statuses == [401] * 30
    assert_throttled(client.get("/secret", headers=GUESS), retry_after=2)  # GCRA: one more every 2 s
    # Answered before it is checked: a 200 among the 429s would confirm a guess.
    assert_throttled(client.get("/secret", headers=good))
    revoked = issue_key(store, name="revoked", scopes=["secret:read"])
    revoke_key(store, revoked.record.id)
    assert_throttled(client.get("/secret", headers={"API-Key": revoked.plaintext}))
    assert_throttled(client.get("/data?token=not-a-token"))
    # Nothing to check, nothing to confirm: those still get their own answer.
    assert client.get("/secret").get_json()["code"] == "missing_credentials"
    assert client.get("/healthz").status_code == 200


def test_the_throttle_lifts_as_time_passes(setup):
    client, _, good = setup(AUTH_FAILURE_LIMIT="2/second")
    assert [client.get("/secret", headers=GUESS).status_code for _ in range(3)] == [401, 401, 429]
    assert_throttled(client.get("/secret", headers=good), retry_after=1)
    time.sleep(0.6)  # one guess of room again (one every 0.5 s)
    resp = client.get("/secret", headers=good)
    assert resp.status_code == 200
    assert resp.headers["X-RateLimit-Remaining"] == "599"  # the throttled request never spent the key's


def test_what_counts_is_a_guess_and_nothing_else(setup):
    client, store, good = setup(AUTH_FAILURE_LIMIT="3/minute")
    revoked = issue_key(store, name="revoked", scopes=["secret:read"])
    revoke_key(store, revoked.record.id)
    fenced = issue_key(store, name="fenced", scopes=["secret:read"], allowed_ips=["10.0.0.0/8"]).plaintext
    reader = issue_key(store, name="reader", scopes=["data:read"]).plaintext
    for _ in range(10):  # none of these is a guess: the secret matched, or nothing was checked
        assert client.get("/secret", headers={"API-Key": revoked.plaintext}).status_code == 401
        assert client.get("/secret", headers={"API-Key": fenced}).status_code == 403
        assert client.get("/secret", headers={"API-Key": reader}).status_code == 403
        assert client.get("/secret").status_code == 401
        assert client.get("/data?token=x", headers=good).status_code == 400  # two credentials
    # A token whose key was revoked since: its signature held, so it is no guess either.
    minted = client.post("/tokens", headers={"API-Key": reader}, json={"scopes": ["data:read"]}).get_json()["token"]
    revoke_key(store, reader[3:15])
    for _ in range(10):
        resp = client.get(f"/data?token={minted}")
        assert resp.status_code == 401 and resp.get_json()["code"] == "invalid_token"
    assert client.get("/secret", headers=good).status_code == 200
    # Bad keys and forged tokens are guesses, alike.
    for resp in (client.get("/secret", headers=GUESS), client.get("/data?token=nope"),
                 client.get("/secret", headers={"API-Key": "kg_short"})):
        assert resp.status_code == 401
    assert_throttled(client.get("/data?token=nope"))


def test_other_addresses_are_unaffected(setup):
    client, _, good = setup(AUTH_FAILURE_LIMIT="3/minute")
    attacker, bystander = {"REMOTE_ADDR": "198.51.100.9"}, {"REMOTE_ADDR": "203.0.113.5"}
    for _ in range(4):
        client.get("/secret", headers=GUESS, environ_base=attacker)
    assert_throttled(client.get("/secret", headers=good, environ_base=attacker))
    assert client.get("/secret", headers=good, environ_base=bystander).status_code == 200
    assert client.get("/secret", headers=GUESS, environ_base=bystander).status_code == 401


def test_a_forged_x_forwarded_for_changes_nothing_without_trusted_proxies(setup):
    client, _, good = setup(AUTH_FAILURE_LIMIT="3/minute")
    for i in range(4):
        client.get("/secret", headers={**GUESS, "X-Forwarded-For": f"192.0.2.{i}"})
    assert_throttled(client.get("/secret", headers={**good, "X-Forwarded-For": "192.0.2.99"}))


def test_behind_a_trusted_proxy_the_forwarded_address_is_throttled(setup):
    client, _, good = setup(AUTH_FAILURE_LIMIT="3/minute", TRUSTED_PROXIES="1")
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    for _ in range(4):
        client.get("/secret", headers={**GUESS, "X-Forwarded-For": "198.51.100.9"}, environ_base=proxy)
    assert_throttled(client.get("/secret", headers={**good, "X-Forwarded-For": "198.51.100.9"},
                                environ_base=proxy))
    # Everyone else behind the same proxy is not.
    assert client.get("/secret", headers={**good, "X-Forwarded-For": "203.0.113.5"},
                      environ_base=proxy).status_code == 200


def test_ipv6_addresses_count_by_their_64(setup):
    client, _, good = setup(AUTH_FAILURE_LIMIT="3/minute")
    for i in range(4):  # a new address of the same /64 for every guess
        client.get("/secret", headers=GUESS, environ_base={"REMOTE_ADDR": f"2001:db8:1:2::{i + 1:x}"})
    assert_throttled(client.get("/secret", headers=good, environ_base={"REMOTE_ADDR": "2001:db8:1:2:ffff::1"}))
    assert client.get("/secret", headers=good, environ_base={"REMOTE_ADDR": "2001:db8:1:3::1"}).status_code == 200


@pytest.mark.parametrize(("remote", "counted_as"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:DB8:0:0:1234:5678:9abc:def0", "2001:db8::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("", "-"),
    (None, "-"),
    ("not-an-address:x", "not-an-address:x"),
])
def test_client_address(remote, counted_as):
    assert client_address(remote) == counted_as


def test_a_throttled_request_is_counted_as_such_not_as_what_it_carried(setup):
    client, store, good = setup(AUTH_FAILURE_LIMIT="2/minute")
    app = client.application
    for _ in range(2):
        client.get("/secret", headers=GUESS)
    for _ in range(3):
        client.get("/secret", headers=good)
    app.extensions["keygate.usage"].flush()
    assert store.auth_failures() == {"invalid_credentials": 2, "auth_throttled": 3}
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    text = scrape(client, admin, environ_base={"REMOTE_ADDR": "203.0.113.5"})  # from another address
    assert value(text, "keygate_rate_limited_total", kind="auth_throttled") == 3
    assert value(text, "keygate_auth_refusals_total", code="invalid_credentials") == 2


def test_the_limit_is_a_setting():
    assert load_settings({}).auth_failure_limit == "30/minute"
    assert load_settings({"AUTH_FAILURE_LIMIT": "100/hour"}).auth_failure_limit == "100/hour"
    for bad in ("lots", "0/minute", "30/fortnight", "-1/second", "３０/minute"):
        with pytest.raises(ConfigError, match="KEYGATE_AUTH_FAILURE_LIMIT"):
            load_settings({"AUTH_FAILURE_LIMIT": bad})


@pytest.mark.slow
def test_serve_refuses_a_bad_limit_in_one_line(env):
    proc = invoke_cli({**env, "KEYGATE_AUTH_FAILURE_LIMIT": "often"}, "serve", "--port", "1")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "KEYGATE_AUTH_FAILURE_LIMIT" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------
# A real server: one budget per address, whichever worker answers
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_exact_across_the_workers_of_a_server(env, start_server, tmp_path: Path):
    env = {**env, "KEYGATE_AUTH_FAILURE_LIMIT": "20/minute"}
    assert invoke_cli(env, "init").returncode == 0
    good = invoke_cli(env, "create-key", "--name", "good", "--scope", "secret:read").stdout.strip()
    server = start_server(workers=2, env_overrides=env)
    wait_for_workers(server, 2)
    statuses = []
    for _ in range(30):  # a new connection each: the two workers take turns
        with requests.Session() as s:
            statuses.append(s.get(server.url + "/secret", headers=GUESS, timeout=10).status_code)
    assert statuses == [401] * 20 + [429] * 10
    with requests.Session() as s:
        resp = s.get(server.url + "/secret", headers={"API-Key": good}, timeout=10)
    assert resp.status_code == 429 and resp.json()["code"] == "auth_throttled"
