"""Rate limits on Redis (issue 17): the embedded limiter's answers, in one round trip.

* every backend (the embedded shared-memory table, one process's memory, Redis) gives
  the same decision, remaining, reset and Retry-After for the same sequence of hits;
* the Redis layout: a prefix, a hash tag per counter, an expiry on every cell;
* one ``EVALSHA`` per hit, the script loaded once and again after a restart;
* a private ``redis-server`` killed, hung and restarted under a limiter, an app and a
  real server: 503 (or fail-open) within a second, and recovery without a restart.

Driving the clock: the embedded limiters take ``now``; the Redis script takes it too,
as an optional last argument that only tests send. Everything else — the script, the
decision, the arithmetic, the storage — is what production runs; production calls
(no ``now``) read Redis' ``TIME``, and the tests below without ``now`` cover that path.
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REDIS_URL, invoke_cli
from keys import issue_key, open_store
from keys.parse import RateLimit
from keys.ratelimit import KEY_NAMESPACE, MemoryLimiter, RateLimitUnavailable, SharedMemoryLimiter
from keys.ratelimit_redis import TIMEOUT, RedisLimiter
from private_redis import PrivateRedis, forget_prefix, test_prefix
from test_ratelimit import need_redis, ratelimit_field

T0 = 1_900_000_000.123_456  # a clock of the tests' own: far from now, with a fraction


@pytest.fixture
def backends(tmp_path: Path):  # noqa: ANN201
    """``{name: limiter}``: the three backends, fresh; Redis under a prefix of its own."""
    need_redis()
    prefix = test_prefix()
    limiters = {
        "shared-memory": SharedMemoryLimiter(tmp_path / "ratelimits.mmap"),
        "memory": MemoryLimiter(),
        "redis": RedisLimiter(REDIS_URL, prefix=prefix),
    }
    yield limiters
    for lim in limiters.values():
        lim.close()
    forget_prefix(prefix)


def run_everywhere(backends, steps) -> dict[str, list]:  # noqa: ANN001
    """Each ``(name, limit, namespace, now)`` hit on every backend, in order."""
    return {label: [lim.hit(name, limit, now=now, namespace=ns) for name, limit, ns, now in steps]
            for label, lim in backends.items()}


def assert_same_answers(backends, steps) -> list:  # noqa: ANN001
    results = run_everywhere(backends, steps)
    expected = results["shared-memory"]
    for label, got in results.items():
        for i, (step, a, b) in enumerate(zip(steps, expected, got, strict=True)):
            assert a == b, f"hit {i} {step}: shared-memory {a} but {label} {b}"
    return expected


# ---------------------------------------------------------------------------------------
# One algorithm, identical answers
# ---------------------------------------------------------------------------------------


def test_gcra_by_hand_on_every_backend(backends):
    """The README's promise, worked out: 5/minute is a burst of 5, then one every 12 s."""
    five, day = RateLimit(5, "minute"), RateLimit(1000, "day")
    steps = [("handkey00001", five, KEY_NAMESPACE, T0)] * 6 + [
        ("handkey00001", five, KEY_NAMESPACE, T0 + 11.9),  # not yet
        ("handkey00001", five, KEY_NAMESPACE, T0 + 12),  # one request's worth is back
        ("handkey00001", five, KEY_NAMESPACE, T0 + 12),
        ("handkey00001", five, KEY_NAMESPACE, T0 + 200),  # idle a whole window: a full burst
        ("handkey00002", five, KEY_NAMESPACE, T0),
    ]
    states = assert_same_answers(backends, steps)
    got = [(s.allowed, s.remaining, s.reset, s.retry_after) for s in states]
    assert got == [
        (True, 4, 12, 0), (True, 3, 24, 0), (True, 2, 36, 0), (True, 1, 48, 0), (True, 0, 60, 0),
        (False, 0, 12, 12),
        (False, 0, 1, 1),
        (True, 0, 60, 0),
        (False, 0, 12, 12),
        (True, 4, 12, 0),
        (True, 4, 12, 0),
    ]
    # A changed limit applies at once: raised, the spent burst becomes a sliver of the new
    # one; lowered below what was spent, it counts as spent, never longer than its window.
    steps = [("handkey00003", five, KEY_NAMESPACE, T0)] * 5 + [("handkey00003", day, KEY_NAMESPACE, T0)]
    steps += [("handkey00003", day, KEY_NAMESPACE, T0 + 1)] * 400
    steps += [("handkey00003", RateLimit(2, "minute"), KEY_NAMESPACE, T0 + 2)]
    states = assert_same_answers(backends, steps)
    assert (states[5].allowed, states[5].remaining) == (True, 998)
    assert all(s.allowed for s in states[6:-1])
    last = states[-1]  # 2/minute: spent, and back in 30 s (not the day's hours)
    assert (last.allowed, last.remaining, last.reset, last.retry_after) == (False, 0, 30, 30)


def _random_steps(rng: random.Random, n: int, names: list[str]) -> list[tuple]:
    limits = [RateLimit(a, u) for a, u in [
        (5, "minute"), (7, "minute"), (3, "hour"), (13, "second"), (600, "minute"), (1000, "day"),
        (86399, "day"), (1, "second"), (100_000_000, "minute"), (999_999_999, "second")]]
    now, steps = T0, []
    for _ in range(n):
        now += rng.choice([0.0] * 12 + [1e-6, 0.001, 0.1, 1.0, 12.0, 86.4, 60.0, 3600.0,
                                        rng.random(), rng.random() * 100])
        limit = rng.choice(limits[:4] if rng.random() < 0.8 else limits)  # mostly steady limits
        steps.append((rng.choice(names), limit, rng.choice([KEY_NAMESPACE] * 4 + ["addr"]), now))
    return steps


def test_every_backend_gives_the_same_answers(backends):
    """3,000 hits: bursts, refusals, fractions of an interval, idle windows, limits that
    change under a key, two namespaces, limits so fine the clock can't resolve them."""
    rng = random.Random(17)
    names = [f"seqkey{uuid.uuid4().hex[:6]}" for _ in range(5)] + ["203.0.113.7", "2001:db8::1"]
    states = assert_same_answers(backends, _random_steps(rng, 3000, names))
    refused = sum(not s.allowed for s in states)
    assert 600 < refused < 2400, refused  # the sequence really exercises both answers


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    amounts=st.lists(st.integers(1, 50), min_size=1, max_size=3),
    unit=st.sampled_from(["second", "minute", "hour", "day"]),
    gaps=st.lists(st.one_of(st.just(0.0), st.floats(0, 2.0), st.floats(0, 100_000)), min_size=1, max_size=40),
    start=st.floats(0, 1e8),
)
def test_any_sequence_gets_the_same_answers(backends, amounts, unit, gaps, start):
    name = f"prop{uuid.uuid4().hex[:8]}"  # each example counts on a cell of its own
    now, steps = T0 - 1e8 + start, []
    for i, gap in enumerate(gaps):
        now += gap * RateLimit(1, unit).period / 100
        steps.append((name, RateLimit(amounts[i % len(amounts)], unit), KEY_NAMESPACE, now))
    assert_same_answers(backends, steps)


# ---------------------------------------------------------------------------------------
# Layout in Redis
# ---------------------------------------------------------------------------------------


def test_cells_live_under_the_prefix_in_a_slot_of_their_own_and_expire(backends):
    """Production hits (Redis' clock): the cell sits at ``<prefix>rl:<namespace>:{<name>}``,
    hashes to the slot of the name alone, and expires when it is a full quota again."""
    import redis
    from redis.crc import key_slot

    lim = backends["redis"]
    with redis.Redis.from_url(REDIS_URL) as client:
        state = lim.hit("layoutkey001", RateLimit(10, "minute"))
        assert (state.remaining, state.reset) == (9, 6)
        cell = f"{lim.prefix}rl:key:{{layoutkey001}}"
        assert client.exists(cell)
        assert key_slot(cell.encode()) == key_slot(b"layoutkey001")
        assert 0 < client.pttl(cell) <= 6000
        lim.hit("203.0.113.7", RateLimit(10, "minute"), namespace="addr")
        assert client.exists(f"{lim.prefix}rl:addr:{{203.0.113.7}}")
        # A cell is worth keeping only while it is ahead of the clock.
        second = RateLimit(2, "second")
        assert [lim.hit("shortkey0001", second).allowed for _ in range(3)] == [True, True, False]
        short = f"{lim.prefix}rl:key:{{shortkey0001}}"
        assert 0 < client.pttl(short) <= 1000
        time.sleep(1.1)
        assert not client.exists(short)
        assert lim.hit("shortkey0001", second).remaining == 1
        assert sorted(client.scan_iter(match=lim.prefix + "*")) == sorted(
            name.encode() for name in [cell, short, f"{lim.prefix}rl:addr:{{203.0.113.7}}"])


def test_a_cell_holding_junk_never_breaks_a_request(backends):
    """Whatever is in a cell (an operator's typo, another program), a hit answers."""
    import redis

    lim, limit = backends["redis"], RateLimit(5, "minute")
    with redis.Redis.from_url(REDIS_URL) as client:
        for i, junk in enumerate([b"garbage", b"nan", b"inf", b"-inf", b"1e308", b"", b"-5"]):
            name = f"junkkey{i:05d}"
            client.set(lim.cell(name), junk)
            state = lim.hit(name, limit)
            assert 0 <= state.retry_after <= 60 and 0 <= state.reset <= 72, (junk, state)
        client.hset(lim.cell("hashkey00001"), "x", "1")  # not even a string: an outage, said so
        with pytest.raises(RateLimitUnavailable):
            lim.hit("hashkey00001", limit)


# ---------------------------------------------------------------------------------------
# One round trip; the script loaded once, and again after a restart
# ---------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path):  # noqa: ANN201
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.stop()


def commands_during(server: PrivateRedis, action) -> list[str]:  # noqa: ANN001
    """The commands clients sent ``server`` while ``action()`` ran (not those a script ran),
    as MONITOR saw them."""
    marker = f"end-{uuid.uuid4().hex}"
    with server.client() as watcher, server.client() as other:
        other.ping()  # connected (and introduced, CLIENT SETINFO) before watching starts
        with watcher.monitor() as monitor:
            return _watch(monitor, action, other, marker)


def _watch(monitor, action, other, marker: str) -> list[str]:  # noqa: ANN001
    action()
    other.echo(marker)
    seen = []
    while True:
        command = monitor.next_command()
        if marker in command["command"]:
            return seen
        if command["client_type"] != "lua":
            seen.append(command["command"].split()[0].upper())



@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_a_hit_is_one_evalsha(private_redis):
    lim, limit = RedisLimiter(private_redis.url, prefix="kg:"), RateLimit(1000, "minute")
    first = commands_during(private_redis, lambda: lim.hit("roundtrip001", limit))
    # A new connection introduces itself; the script is unknown (NOSCRIPT), loaded, run.
    assert [c for c in first if c not in ("HELLO", "CLIENT")] == ["EVALSHA", "SCRIPT", "EVALSHA"], first
    later = commands_during(private_redis, lambda: [lim.hit(f"roundtrip{i:03d}", limit) for i in range(50)])
    assert later == ["EVALSHA"] * 50
    assert private_redis.script_loads() == 1
    lim.close()


@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_redis_killed_then_restarted_needs_no_restart_of_ours(private_redis):
    lim, limit = RedisLimiter(private_redis.url, prefix="kg:"), RateLimit(3, "minute")
    assert [lim.hit("restart00001", limit).remaining for _ in range(2)] == [2, 1]
    private_redis.kill()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(RateLimitUnavailable):
            lim.hit("restart00001", limit)
        assert time.monotonic() - started < 1.0
    private_redis.start()  # empty: no script, no cells (--save "")
    assert private_redis.script_loads() == 0
    assert lim.hit("restart00001", limit).remaining == 2  # its state went with the server
    assert private_redis.script_loads() == 1  # NOSCRIPT: loaded again, once
    assert [lim.hit("restart00001", limit).allowed for _ in range(3)] == [True, True, False]
    assert private_redis.script_loads() == 1
    lim.close()


@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_a_hung_redis_costs_under_a_second_and_keeps_its_counts(private_redis):
    lim, limit = RedisLimiter(private_redis.url, prefix="kg:"), RateLimit(5, "minute")
    assert lim.hit("hungkey00001", limit).remaining == 4
    private_redis.pause()
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(RateLimitUnavailable):
                lim.hit("hungkey00001", limit)
            assert TIMEOUT <= time.monotonic() - started < 1.0
    finally:
        private_redis.resume()
    # The connection that waited was dropped and a fresh one carries on, with the count
    # kept. A hit the hung server had already received runs when it wakes up, though its
    # caller got a 503: at worst a client is charged for what it was refused.
    after = [lim.hit("hungkey00001", limit).remaining for _ in range(2)]
    assert after[0] in (3, 2, 1) and after[1] == after[0] - 1, after
    lim.close()


# ---------------------------------------------------------------------------------------
# The same outages as a client of the API sees them
# ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_app(private_redis, make_app):  # noqa: ANN001, ANN201
    """``redis_app(**config)`` → (test client, key plaintext): an app on the private Redis."""
    store = open_store("memory://")
    store.migrate()
    plaintext = issue_key(store, name="c", scopes=["secret:read"], rate_limit="10/minute").plaintext

    def make(**config):  # noqa: ANN202
        app = make_app(store, RATELIMIT_STORAGE_URL=private_redis.url, RATELIMIT_PREFIX="kg:", **config)
        return app.test_client(), {"API-Key": plaintext}

    yield make
    store.close()


def assert_unavailable(resp) -> None:  # noqa: ANN001
    assert resp.status_code == 503
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.get_json(force=True)["code"] == "rate_limit_unavailable"
    assert resp.headers["Retry-After"] == "5"
    assert "RateLimit" not in resp.headers


@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_an_app_answers_503_while_redis_is_down_and_recovers_by_itself(private_redis, redis_app):
    client, key = redis_app()
    assert ratelimit_field(client.get("/secret", headers=key)) == (9, 6)
    private_redis.pause()
    try:
        started = time.monotonic()
        assert_unavailable(client.get("/secret", headers=key))
        assert time.monotonic() - started < 1.0
    finally:
        private_redis.resume()
    assert ratelimit_field(client.get("/secret", headers=key))[0] in (8, 7)  # 7: the hung hit ran late
    private_redis.kill()
    assert_unavailable(client.get("/secret", headers=key))
    assert client.get("/healthz").status_code == 200
    private_redis.start()
    resp = client.get("/secret", headers=key)
    assert resp.status_code == 200 and ratelimit_field(resp)[0] == 9  # a fresh Redis, a fresh quota


@pytest.mark.slow  # a private redis-server of its own (a subprocess)
def test_an_app_told_to_fail_open_lets_requests_through_while_redis_is_hung(private_redis, redis_app):
    client, key = redis_app(RATELIMIT_FAIL_OPEN="1")
    private_redis.pause()
    try:
        for _ in range(2):
            started = time.monotonic()
            resp = client.get("/secret", headers=key)
            assert resp.status_code == 200 and "RateLimit" not in resp.headers
            assert time.monotonic() - started < 1.0
    finally:
        private_redis.resume()
    # Counted again (8 when a hit sent to the hung server ran once it woke up).
    assert ratelimit_field(client.get("/secret", headers=key))[0] in (9, 8)


@pytest.mark.slow
def test_a_server_rides_out_a_redis_restart(env, start_server, private_redis):
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    created = invoke_cli(env, "create-key", "--name", "r", "--scope", "secret:read", "--rate-limit", "100/minute",
                      "--json")
    assert created.returncode == 0, created.stderr
    import json

    key = {"API-Key": json.loads(created.stdout)["key"], "Connection": "close"}
    server = start_server(workers=2, env_overrides={"KEYGATE_RATELIMIT_STORAGE_URL": private_redis.url})
    assert server.get("/secret", headers=key).status_code == 200
    private_redis.kill()
    for _ in range(4):
        assert_unavailable_real(server.get("/secret", headers=key))
    private_redis.start()
    codes = [server.get("/secret", headers=key).status_code for _ in range(6)]
    assert codes == [200] * 6
    assert private_redis.script_loads() >= 1
    output = server.output()
    assert "the rate-limit store is unavailable" in output and "Traceback" not in output


def assert_unavailable_real(resp) -> None:  # noqa: ANN001
    assert resp.status_code == 503
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.json()["code"] == "rate_limit_unavailable"
