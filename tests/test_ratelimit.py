"""Per-key rate limits (issues 4 and 17), as a client and an operator see them.

* the limiters themselves, one suite over every backend (the embedded shared-memory
  GCRA table, one process's memory, and a real Redis), all GCRA;
* the HTTP surface (429 ``rate_limited`` problems, ``Retry-After``, the IETF RateLimit
  header fields and ``X-RateLimit-*``) through the Flask test client;
* real ``manage.py serve`` processes: several workers on one host, and two servers on
  one Redis, must not multiply a key's limit;
* a limit store that is down fails in the direction the operator chose.

That every backend gives the same answers for the same hits, and Redis' own story
(one round trip, its key layout, outages of a private server), are in
``test_ratelimit_redis.py``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import re
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from api import create_app
from api.config import load_settings
from conftest import REDIS_URL, invoke_cli, need_service, wait_for_workers
from keys import ConfigError, issue_key, open_store
from keys.parse import RateLimit
from keys.ratelimit import (
    MemoryLimiter,
    RateLimitUnavailable,
    SharedMemoryLimiter,
    open_limiter,
)
from keys.ratelimit_redis import RedisLimiter
from private_redis import forget_prefix, test_prefix

UNREACHABLE_REDIS = "redis://127.0.0.1:1"
_redis = urlsplit(REDIS_URL)
REDIS_HOST, REDIS_PORT = _redis.hostname or "127.0.0.1", _redis.port or 6379


def need_redis() -> None:
    need_service("Redis", REDIS_HOST, REDIS_PORT)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own on the shared Redis, emptied afterwards."""
    prefix = test_prefix()
    yield prefix
    forget_prefix(prefix)


# ---------------------------------------------------------------------------------------
# The limiters: one suite, every backend
# ---------------------------------------------------------------------------------------

LIMITERS = ["shared-memory", "memory", "redis"]


class Ids:
    """Fresh key ids for one test (12 characters, like real ones)."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:8]
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n:04d}"


@pytest.fixture
def ids() -> Ids:
    return Ids()


@pytest.fixture(params=LIMITERS)
def limiter(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    if request.param == "shared-memory":
        lim = SharedMemoryLimiter(tmp_path / "ratelimits.mmap")
    elif request.param == "memory":
        lim = MemoryLimiter()
    else:
        need_redis()
        prefix = test_prefix()
        request.addfinalizer(lambda: forget_prefix(prefix))
        lim = RedisLimiter(REDIS_URL, prefix=prefix)
    yield lim
    lim.close()


def test_allows_exactly_n_then_refuses_with_a_retry_hint(limiter, ids):
    key, limit = ids(), RateLimit(5, "minute")
    states = [limiter.hit(key, limit) for _ in range(5)]
    assert [s.allowed for s in states] == [True] * 5
    assert [s.remaining for s in states] == [4, 3, 2, 1, 0]
    for s in states:
        assert s.retry_after == 0
        assert 0 < s.reset <= 60
        assert s.limit == limit

    for _ in range(3):
        refused = limiter.hit(key, limit)
        assert not refused.allowed
        assert refused.remaining == 0
        assert 1 <= refused.retry_after <= 60
        # The contract: Retry-After is never earlier than RateLimit's t.
        assert refused.retry_after >= refused.reset


def test_refused_hits_cost_nothing_and_retry_after_is_enough(limiter, ids):
    """A client hammering a refused key does not push its quota further away, and a
    client that waits Retry-After seconds gets through."""
    key, limit = ids(), RateLimit(1, "second")
    t0 = time.time()  # the clock is injected (``now``): the same moments on every backend, no sleeping
    assert limiter.hit(key, limit, now=t0).allowed
    # Refusals spread over half the window: had they counted, the window that follows
    # the allowed hit's expiry would still be full of them.
    for i in range(26):
        state = limiter.hit(key, limit, now=t0 + i * 0.02)
        assert not state.allowed
        assert state.retry_after >= max(1, state.reset)
    t1 = t0 + 1.15
    assert limiter.hit(key, limit, now=t1).allowed

    refused = limiter.hit(key, limit, now=t1 + 0.01)
    assert not refused.allowed
    assert not limiter.hit(key, limit, now=t1 + 0.5).allowed
    assert limiter.hit(key, limit, now=t1 + 0.01 + refused.retry_after).allowed


def test_keys_are_independent(limiter, ids):
    a, b, limit = ids(), ids(), RateLimit(2, "minute")
    assert [limiter.hit(a, limit).allowed for _ in range(3)] == [True, True, False]
    assert [limiter.hit(b, limit).allowed for _ in range(3)] == [True, True, False]
    assert not limiter.hit(a, limit).allowed
    c = ids()
    assert limiter.hit(c, RateLimit(1, "day")).allowed


# (limit, hits per thread): enough contention to expose a missing lock, within a second.
CONTENTION = {"shared-memory": (40_000, 10_000), "memory": (10_000, 2_500), "redis": (400, 100)}


def test_exact_under_thread_concurrency(limiter, ids, request):
    key, threads = ids(), 8
    amount, per_thread = CONTENTION[request.node.callspec.params["limiter"]]
    limit = RateLimit(amount, "day")
    barrier = threading.Barrier(threads)
    allowed = [0] * threads

    def worker(i: int) -> None:
        barrier.wait()
        allowed[i] = sum(limiter.hit(key, limit).allowed for _ in range(per_thread))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up
    try:
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert threads * per_thread == 2 * amount
    assert sum(allowed) == amount


# -- the embedded table: several processes, a full table, a damaged file -----------------


PROCESS_LIMIT = RateLimit(20_000, "day")


def _hammer(path: str, key: str, hits: int, start, out, index: int) -> None:  # noqa: ANN001
    lim = SharedMemoryLimiter(path)  # each process maps the file itself, as a worker does
    start.wait(60)
    out[index] = sum(lim.hit(key, PROCESS_LIMIT).allowed for _ in range(hits))
    lim.close()


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_shared_memory_is_exact_across_processes(tmp_path):
    """Four processes (server workers, say) opening the same file share one limit:
    40,000 hits against 20,000/day give exactly 20,000 successes in total."""
    ctx = multiprocessing.get_context("fork")
    path, procs_n, hits = str(tmp_path / "ratelimits.mmap"), 4, 10_000
    start = ctx.Barrier(procs_n + 1)  # released once every process has mapped the file
    out = ctx.Array("i", procs_n, lock=False)
    procs = [ctx.Process(target=_hammer, args=(path, "sharedkey001", hits, start, out, i))
             for i in range(procs_n)]
    for p in procs:
        p.start()
    start.wait(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(out) == PROCESS_LIMIT.amount
    # They really did compete (on a loaded machine one may be scheduled only once the
    # others have spent the quota, so not necessarily all four).
    assert sum(n > 0 for n in out) >= 2, list(out)
    # The parent sees the same exhausted key.
    again = SharedMemoryLimiter(path)
    assert not again.hit("sharedkey001", PROCESS_LIMIT).allowed
    again.close()


def _hammer_inherited(lim: SharedMemoryLimiter, key: str, hits: int, start, out, index: int) -> None:  # noqa: ANN001
    start.wait(60)
    out[index] = sum(lim.hit(key, PROCESS_LIMIT).allowed for _ in range(hits))


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_shared_memory_is_exact_in_workers_forked_after_it_was_opened(tmp_path):
    """A server that opens the table and then forks its workers (a preloading server):
    every child must lock on its own, or the ``flock`` they inherit excludes nobody and
    the children count over each other."""
    ctx = multiprocessing.get_context("fork")
    lim = SharedMemoryLimiter(tmp_path / "ratelimits.mmap")
    procs_n, hits = 4, 10_000
    start = ctx.Barrier(procs_n + 1)
    out = ctx.Array("i", procs_n, lock=False)
    procs = [ctx.Process(target=_hammer_inherited, args=(lim, "forkedkey001", hits, start, out, i))
             for i in range(procs_n)]
    for p in procs:
        p.start()
    start.wait(60)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(out) == PROCESS_LIMIT.amount
    assert not lim.hit("forkedkey001", PROCESS_LIMIT).allowed  # the parent shares the table
    lim.close()


def _keep_hitting(path: str, slots: int, ready, stop, out) -> None:  # noqa: ANN001
    lim = SharedMemoryLimiter(path, slots=slots)
    limit = RateLimit(1_000_000, "day")
    keys = [f"layoutkey{i:03d}" for i in range(200)]  # spread over the whole table
    ready.set()
    n = 0
    while not stop.is_set():
        n += sum(lim.hit(k, limit).allowed for k in keys)
    out.value = n
    lim.close()


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_another_layout_never_crashes_a_process_that_has_the_table_mapped(tmp_path):
    """A process opening the same file with another layout (a keygate upgrade starting beside
    the old one) must leave the running one alone: truncating a file that another process
    has mapped kills that process with SIGBUS at its next hit."""
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "ratelimits.mmap")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Value("l", 0)
    worker = ctx.Process(target=_keep_hitting, args=(path, 4096, ready, stop, out))
    worker.start()
    assert ready.wait(30)
    newcomer = SharedMemoryLimiter(path, slots=16)  # a much smaller table at the same path
    assert [newcomer.hit("newcomer0001", RateLimit(2, "day")).allowed for _ in range(3)] == [True, True, False]
    time.sleep(0.3)  # the old worker keeps hitting its (now replaced) table meanwhile
    stop.set()
    worker.join(30)
    assert worker.exitcode == 0, f"the running worker died (exit {worker.exitcode})"
    assert out.value > 0
    newcomer.close()


def test_the_table_file_names_its_layout(tmp_path):
    """open_limiter's file carries the layout version in its name, so two keygate versions
    on one host never even compete for one file."""
    lim = open_limiter(None, tmp_path)
    assert lim.path.name == "ratelimits-0003.mmap"
    lim.close()


def test_shared_memory_survives_a_worker_restart(tmp_path):
    path, limit = tmp_path / "ratelimits.mmap", RateLimit(2, "day")
    first = SharedMemoryLimiter(path)
    assert [first.hit("restartkey01", limit).allowed for _ in range(3)] == [True, True, False]
    first.close()
    again = SharedMemoryLimiter(path)  # a restarted worker must not get a fresh quota
    assert not again.hit("restartkey01", limit).allowed
    again.close()


def test_a_guard_spent_by_another_process_refuses_here_at_once(tmp_path):
    """A key's hit reads its address's guard only while some guard is ahead of now (the
    table's header says so): a guard spent through another open table (another worker)
    must still refuse this process's very next hit, and stop doing so once it is paid off."""
    from keys.ratelimit import Counter as Guarded

    path, key_limit = tmp_path / "ratelimits.mmap", RateLimit(1000, "minute")
    guard = Guarded("198.51.100.9", RateLimit(3, "minute"), "authfail")
    bystander = Guarded("203.0.113.5", RateLimit(3, "minute"), "authfail")
    here, worker = SharedMemoryLimiter(path), SharedMemoryLimiter(path)
    t0 = 1_000_000.0
    throttled, counted = here.hit_unless("guardkey0001", key_limit, guard, now=t0)
    assert throttled is None and counted.remaining == 999  # nothing spent anywhere: passes, counted
    for _ in range(3):  # three refused credentials from the address, counted by the other worker
        assert worker.hit(guard.name, guard.limit, now=t0, namespace=guard.namespace).allowed
    throttled, counted = here.hit_unless("guardkey0001", key_limit, guard, now=t0 + 1)
    assert counted is None and throttled is not None and not throttled.allowed
    assert throttled.retry_after == 19  # the guard's next one comes back 20 s after t0
    assert here.hit_unless("guardkey0001", key_limit, bystander, now=t0 + 1)[0] is None  # others pass
    assert here.hit_unless("guardkey0001", key_limit, guard, now=t0 + 20)[0] is None  # paid off
    assert here.hit_unless("guardkey0001", key_limit, guard, now=t0 + 61)[0] is None  # all cold again
    here.close()
    worker.close()


def test_junk_in_the_guard_field_only_costs_a_read(tmp_path):
    """A header whose guard field holds junk (NaN, a far future) never lets a spent guard
    through: the guard is read as if some were ahead, and NaN is replaced at the next write."""
    import mmap
    import struct

    from keys.ratelimit import Counter as Guarded

    path, key_limit = tmp_path / "ratelimits.mmap", RateLimit(1000, "minute")
    guard = Guarded("198.51.100.9", RateLimit(1, "minute"), "authfail")
    lim = SharedMemoryLimiter(path)
    t0 = 1_000_000.0

    def field(value: float | None = None) -> float:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            if value is not None:
                m[16:24] = struct.pack("<d", value)
            return struct.unpack("<d", m[16:24])[0]

    assert lim.hit(guard.name, guard.limit, now=t0, namespace=guard.namespace).allowed  # spent
    field(float("nan"))
    assert not lim.hit_unless("junkkey00001", key_limit, guard, now=t0 + 1)[0].allowed
    assert lim.hit(guard.name, guard.limit, now=t0 + 61, namespace=guard.namespace).allowed
    assert field() == t0 + 121  # the NaN replaced by the guard's TAT
    field(1e300)
    bystander = Guarded("203.0.113.5", RateLimit(1, "minute"), "authfail")
    assert lim.hit_unless("junkkey00001", key_limit, bystander, now=t0 + 62)[0] is None
    assert not lim.hit_unless("junkkey00001", key_limit, guard, now=t0 + 62)[0].allowed
    lim.close()


def test_a_full_table_never_wrongly_refuses(tmp_path):
    """Far more live keys than slots: keys may be evicted (and so get a fresh quota),
    but no key is ever refused within its limit."""
    lim = SharedMemoryLimiter(tmp_path / "small.mmap", slots=4)
    keys = [f"fullkey{i:05d}" for i in range(40)]
    limit = RateLimit(3, "day")
    for _ in range(3):
        for key in keys:
            assert lim.hit(key, limit).allowed, key
    # A key that keeps its cell (nobody else competes meanwhile) is limited exactly.
    assert [lim.hit("lonekey00001", limit).allowed for _ in range(10)] == [True] * 3 + [False] * 7
    lim.close()


def test_two_workers_share_cells_that_move_under_them(tmp_path):
    """Each worker remembers where a key's cell was; another worker may since have reused
    that cell (once expired) for another key. A stale memory must never count a hit
    against the other key's cell, nor lose one."""
    path, limit, t0, slots = tmp_path / "ratelimits.mmap", RateLimit(3, "minute"), 1_900_000_000.0, 64
    a, b = SharedMemoryLimiter(path, slots=slots), SharedMemoryLimiter(path, slots=slots)
    stale = "stalekey0001"
    home = zlib.crc32(stale.encode()) % slots
    other = next(k for k in (f"otherkey{i:04d}" for i in range(10_000))
                 if zlib.crc32(k.encode()) % slots == home)  # probes the same cells first
    assert a.hit(stale, limit, now=t0).remaining == 2  # a remembers the cell
    later = t0 + 3600  # the cell has long expired: free for anyone
    assert b.hit(other, limit, now=later).remaining == 2  # b reuses it for another key
    # a's memory points at the other key's cell: it must look again, not write there.
    assert a.hit(stale, limit, now=later).remaining == 2  # a fresh quota, in a cell of its own
    assert b.hit(other, limit, now=later).remaining == 1  # untouched by a
    assert a.hit(other, limit, now=later).remaining == 0
    assert [b.hit(stale, limit, now=later).remaining, a.hit(stale, limit, now=later).allowed] == [1, True]
    assert not b.hit(stale, limit, now=later).allowed
    # Within the table's capacity, two workers interleaving hits count every key exactly.
    x, y = SharedMemoryLimiter(tmp_path / "t.mmap", slots=8), SharedMemoryLimiter(tmp_path / "t.mmap", slots=8)
    keys = [f"interleave{i:02d}" for i in range(6)]
    rng = random.Random(7)
    allowed = dict.fromkeys(keys, 0)
    for _ in range(60):
        key = rng.choice(keys)
        allowed[key] += rng.choice([x, y]).hit(key, limit, now=t0).allowed
    assert allowed == dict.fromkeys(keys, 3)
    for lim in (a, b, x, y):
        lim.close()


def _works_from_scratch(lim: SharedMemoryLimiter, key: str = "damagedkey01") -> None:
    limit = RateLimit(3, "day")
    assert [lim.hit(key, limit).allowed for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other-size"])
def test_a_damaged_table_file_is_reset(tmp_path, damage):
    path = tmp_path / "ratelimits.mmap"
    lim = SharedMemoryLimiter(path, slots=64)
    lim.hit("damagedkey01", RateLimit(3, "day"))
    lim.close()
    size = path.stat().st_size
    if damage == "garbage":
        path.write_bytes(os.urandom(size))
    elif damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(path.read_bytes() + b"\0" * 4096)
    lim = SharedMemoryLimiter(path, slots=64)
    _works_from_scratch(lim)
    lim.close()
    assert path.stat().st_size == size


def test_garbage_cells_never_refuse_a_new_key(tmp_path):
    """A table whose cells hold random bytes (a valid header over junk) still gives every
    key its full quota and enforces it."""
    path = tmp_path / "ratelimits.mmap"
    SharedMemoryLimiter(path, slots=256).close()
    with open(path, "r+b") as f:
        f.seek(64)
        f.write(os.urandom(path.stat().st_size - 64))
    lim = SharedMemoryLimiter(path, slots=256)
    for i in range(50):
        _works_from_scratch(lim, f"junkkey{i:05d}")
    lim.close()


def test_namespaces_are_counters_of_their_own(limiter, ids):
    """A second kind of counter (per client address, say) shares the path, never a cell."""
    name, limit = ids(), RateLimit(2, "minute")
    assert [limiter.hit(name, limit).allowed for _ in range(3)] == [True, True, False]
    assert [limiter.hit(name, limit, namespace="addr").allowed for _ in range(3)] == [True, True, False]
    for address in ["203.0.113.7", "2001:db8::1", "::ffff:10.0.0.1"]:
        assert limiter.hit(address, limit, namespace="addr").remaining == 1
    for bad in ["", "Key", "a b", "x{y}", "a" * 17, "1addr", None]:
        with pytest.raises(ValueError, match="namespace"):
            limiter.hit(name, limit, namespace=bad)


def test_an_unreachable_redis_is_reported_not_crashed():
    lim = RedisLimiter(UNREACHABLE_REDIS)
    with pytest.raises(RateLimitUnavailable) as e:
        lim.hit("anykey000001", RateLimit(5, "minute"))
    assert e.value.status == 503
    lim.close()


def test_open_limiter_picks_the_backend(tmp_path):
    embedded = open_limiter(None, tmp_path / "inst")
    assert isinstance(embedded, SharedMemoryLimiter)
    assert list((tmp_path / "inst").glob("ratelimits-*.mmap"))
    embedded.close()
    assert isinstance(open_limiter("memory://", tmp_path), MemoryLimiter)
    for url in ["redis://127.0.0.1:6379/0", "rediss://cache.internal:6380", "redis+unix:///run/redis.sock"]:
        lim = open_limiter(url, tmp_path, prefix="tenant-a:")
        assert isinstance(lim, RedisLimiter)
        assert lim.cell("abc123def456") == "tenant-a:rl:key:{abc123def456}"
        lim.close()
    with pytest.raises(ConfigError, match="unknown rate-limit storage 'mongodb'"):
        open_limiter("mongodb://127.0.0.1", tmp_path)  # the service adds the variable's name


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["maybe", "2", "enable"])
def test_a_bad_fail_open_value_names_the_variable(value, monkeypatch):
    with pytest.raises(ConfigError, match="KEYGATE_RATELIMIT_FAIL_OPEN"):
        load_settings({"RATELIMIT_FAIL_OPEN": value})
    monkeypatch.setenv("KEYGATE_RATELIMIT_FAIL_OPEN", value)
    with pytest.raises(ConfigError, match="KEYGATE_RATELIMIT_FAIL_OPEN"):
        create_app({"DATABASE_URL": "memory://"})


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("no", False), ("", False), (None, False),
])
def test_fail_open_values(value, expected):
    overrides = {} if value is None else {"RATELIMIT_FAIL_OPEN": value}
    assert load_settings(overrides).ratelimit_fail_open is expected


@pytest.mark.parametrize(("name", "value"), [
    ("RATELIMIT_STORAGE_URL", "mongodb://127.0.0.1"),
    ("RATELIMIT_STORAGE_URL", "127.0.0.1:6379"),
    ("DEFAULT_RATE_LIMIT", "lots"),
    ("DEFAULT_RATE_LIMIT", "0/minute"),
])
def test_bad_limit_settings_name_the_variable(name, value):
    with pytest.raises(ConfigError, match="KEYGATE_" + name):
        load_settings({name: value})


BAD_PREFIXES = ["key gate:", "kg{tenant}:", "kg}", "kg:\n", "ключ:", "a" * 65, " ", "kg\x00", "\t"]


@pytest.mark.parametrize("value", BAD_PREFIXES)
def test_a_bad_redis_prefix_names_the_variable(value, monkeypatch):
    with pytest.raises(ConfigError, match="KEYGATE_RATELIMIT_PREFIX") as e:
        load_settings({"RATELIMIT_PREFIX": value})
    assert "\n" not in str(e.value)  # one line, whatever the value held
    if "\x00" not in value:
        monkeypatch.setenv("KEYGATE_RATELIMIT_PREFIX", value)
        with pytest.raises(ConfigError, match="KEYGATE_RATELIMIT_PREFIX"):
            create_app({"DATABASE_URL": "memory://"})


@pytest.mark.parametrize(("value", "expected"), [
    (None, "keygate:"), ("", "keygate:"), ("tenant-a:", "tenant-a:"), ("kg", "kg"),
    ("a" * 64, "a" * 64), ("prod/keygate|v2:", "prod/keygate|v2:"),
])
def test_redis_prefix_values(value, expected):
    overrides = {} if value is None else {"RATELIMIT_PREFIX": value}
    assert load_settings(overrides).ratelimit_prefix == expected


def test_serve_refuses_a_bad_redis_prefix_in_one_line(env):
    result = invoke_cli({**env, "KEYGATE_RATELIMIT_PREFIX": "kg{x}:"}, "serve", "--port", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "KEYGATE_RATELIMIT_PREFIX" in lines[0], result.stderr


def test_serve_refuses_a_bad_fail_open_value_in_one_line(env):
    result = invoke_cli({**env, "KEYGATE_RATELIMIT_FAIL_OPEN": "perhaps"}, "serve", "--port", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "KEYGATE_RATELIMIT_FAIL_OPEN" in lines[0]


@pytest.mark.parametrize("url", ["mongodb://127.0.0.1", "redis://127.0.0.1:notaport", "redis://h:99999",
                                 "redis://127.0.0.1:6379/zero", "redis+unix://", "redis://h\tx:6379",
                                 "redis://127.0.0.1/0?socket_timeout=soon"])
def test_serve_refuses_a_bad_storage_url_in_one_line(env, url):
    """Caught before the server starts, not as a traceback in every worker that boots."""
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    result = invoke_cli({**env, "KEYGATE_RATELIMIT_STORAGE_URL": url}, "serve", "--port", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "KEYGATE_RATELIMIT_STORAGE_URL" in lines[0], result.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# HTTP, through the Flask test client
# ---------------------------------------------------------------------------------------

_RATELIMIT_RE = re.compile(r'"key";r=(\d+);t=(\d+)')


def ratelimit_field(resp) -> tuple[int, int]:  # noqa: ANN001
    """``RateLimit: "key";r=R;t=T`` → (R, T)."""
    m = _RATELIMIT_RE.fullmatch(resp.headers["RateLimit"])
    assert m, resp.headers["RateLimit"]
    return int(m.group(1)), int(m.group(2))


@pytest.fixture
def make_app(tmp_path):  # noqa: ANN201
    """``make_app(store=None, **settings)`` → (app, store); a memory store by default."""
    made = []

    def make(store=None, **config):  # noqa: ANN001, ANN202
        if store is None:
            store = open_store("memory://")
            store.migrate()
        config.setdefault("INSTANCE_PATH", str(tmp_path / "instance"))
        app = create_app(config, store=store)
        made.append(app)
        return app, store

    yield make
    for app in made:
        app.extensions["keygate.usage"].close()
        app.extensions["keygate.ratelimits"].limiter.close()


def new_key(store, rate_limit=None, scopes=("secret:read", "data:read"), name="client"):  # noqa: ANN001, ANN201
    issued = issue_key(store, name=name, scopes=list(scopes), rate_limit=rate_limit)
    return issued.plaintext, issued.record.id


def assert_rate_limited(resp, limit: int, window: int = 60) -> None:  # noqa: ANN001
    assert resp.status_code == 429
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.get_json(force=True)
    assert body["code"] == "rate_limited"
    assert body["status"] == 429
    assert {"type", "title", "detail", "instance"} <= body.keys()
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= window
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["RateLimit-Policy"] == f'"key";q={limit};w={window}'
    remaining, t = ratelimit_field(resp)
    assert remaining == 0
    assert retry_after >= t  # never earlier than t


def test_a_key_limited_to_5_per_minute_gets_exactly_5_then_429(make_app):
    app, store = make_app()
    plaintext, _ = new_key(store, "5/minute")
    client = app.test_client()
    before = int(time.time())
    for expected_remaining in [4, 3, 2, 1, 0]:
        resp = client.get("/secret", headers={"API-Key": plaintext})
        assert resp.status_code == 200
        assert resp.get_json()["message"] == "Welcome to the secret page!"
        assert resp.headers["RateLimit-Policy"] == '"key";q=5;w=60'
        remaining, t = ratelimit_field(resp)
        assert remaining == expected_remaining
        assert 1 <= t <= 60
        assert resp.headers["X-RateLimit-Limit"] == "5"
        assert resp.headers["X-RateLimit-Remaining"] == str(remaining)
        assert before <= int(resp.headers["X-RateLimit-Reset"]) <= int(time.time()) + 61
        assert resp.headers["Cache-Control"] == "no-store"
    for _ in range(3):
        resp = client.get("/secret", headers={"API-Key": plaintext})
        assert_rate_limited(resp, 5)
        assert resp.headers["X-RateLimit-Remaining"] == "0"
        assert "Welcome" not in resp.get_data(as_text=True)


def test_403s_for_scope_count_against_the_keys_own_limit(make_app):
    """Issue 12: 30 of 30 scope probes with a 10/minute key got 403. A stolen key probing for
    scopes spends its own quota; the 403s carry the limit's state; they are not uses."""
    app, store = make_app()
    plaintext, key_id = new_key(store, "10/minute", scopes=("secret:read",))
    client = app.test_client()
    statuses = []
    for path in ["/admin", "/data", "/admin/keys"] * 10:
        resp = client.get(path, headers={"API-Key": plaintext})
        statuses.append(resp.status_code)
        if resp.status_code == 403:
            assert resp.get_json()["code"] == "insufficient_scope"
            assert resp.headers["RateLimit-Policy"] == '"key";q=10;w=60'
    assert statuses == [403] * 10 + [429] * 20
    assert_rate_limited(client.get("/secret", headers={"API-Key": plaintext}), 10)  # the quota is spent
    app.extensions["keygate.usage"].flush()
    assert store.get(key_id).use_count == 0


def test_a_token_on_a_header_only_route_counts_too(make_app):
    app, store = make_app()
    plaintext, _ = new_key(store, "2/minute")
    client = app.test_client()
    token = client.post("/tokens", headers={"API-Key": plaintext}).get_json()["token"]
    assert client.get("/secret", query_string={"token": token}).status_code == 403
    assert_rate_limited(client.get("/data", query_string={"token": token}), 2)


def test_403s_from_outside_the_allow_list_do_not_spend_the_owners_quota(make_app):
    """A documented exception: counting them would let a stolen, fenced key's thief use up
    its owner's quota from anywhere."""
    app, store = make_app()
    fenced = issue_key(store, name="fenced", scopes=["secret:read"], rate_limit="2/minute",
                       allowed_ips=["10.0.0.0/8"])
    client = app.test_client()
    for _ in range(5):
        assert client.get("/secret", headers={"API-Key": fenced.plaintext}).status_code == 403
    inside = {"REMOTE_ADDR": "10.1.2.3"}
    assert client.get("/secret", headers={"API-Key": fenced.plaintext}, environ_base=inside).status_code == 200


RATE_LIMIT_HEADERS = ["RateLimit-Policy", "RateLimit", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                      "X-RateLimit-Reset"]


def test_every_response_to_a_limited_key_carries_each_header_once(make_app):
    """Views' responses get the headers as they are sent, other responses (problems, 204s)
    in the after-request hook: every kind gets all five, never twice."""
    app, store = make_app()
    admin, _ = new_key(store, "6/minute", scopes=["admin"])
    reader, reader_id = new_key(store)
    client = app.test_client()
    A = {"API-Key": admin}
    responses = {
        "200 json": client.get("/secret", headers=A),
        "201 created": client.post("/tokens", headers=A, json={"ttl": 60}),
        "200 head": client.head("/data", headers=A),
        "204 no content": client.delete(f"/admin/keys/{reader_id}", headers=A),
        "404 problem": client.get("/admin/keys/AAAAAAAAAAAA", headers=A),
        "400 problem": client.post("/admin/keys", headers=A, json={"name": ""}),
        "429 problem": client.get("/secret", headers=A),
    }
    assert [r.status_code for r in responses.values()] == [200, 201, 200, 204, 404, 400, 429]
    for what, resp in responses.items():
        for name in RATE_LIMIT_HEADERS:
            assert len(resp.headers.getlist(name)) == 1, (what, name, resp.headers)
        assert resp.headers["RateLimit-Policy"] == '"key";q=6;w=60', what
    assert [ratelimit_field(r)[0] for r in responses.values()] == [5, 4, 3, 2, 1, 0, 0]
    # A request that never got as far as the limit carries none of them.
    for resp in [client.get("/secret"), client.get("/secret", headers={"API-Key": reader}),
                 client.get("/healthz")]:
        assert not any(name in resp.headers for name in RATE_LIMIT_HEADERS), resp.headers


def test_keys_without_their_own_limit_use_the_default(make_app, monkeypatch):
    monkeypatch.setenv("KEYGATE_DEFAULT_RATE_LIMIT", "3/minute")
    app, store = make_app()
    default_key, _ = new_key(store)
    own_key, _ = new_key(store, "5/minute")
    client = app.test_client()
    codes = [client.get("/secret", headers={"API-Key": default_key}).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    assert_rate_limited(client.get("/secret", headers={"API-Key": default_key}), 3)
    codes = [client.get("/secret", headers={"API-Key": own_key}).status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]


def test_the_default_default_is_600_per_minute(make_app):
    app, store = make_app()
    plaintext, _ = new_key(store)
    resp = app.test_client().get("/secret", headers={"API-Key": plaintext})
    assert resp.headers["RateLimit-Policy"] == '"key";q=600;w=60'
    assert ratelimit_field(resp)[0] == 599


def test_other_keys_are_unaffected(make_app):
    app, store = make_app()
    noisy, _ = new_key(store, "2/minute")
    quiet, _ = new_key(store, "2/minute")
    client = app.test_client()
    assert [client.get("/secret", headers={"API-Key": noisy}).status_code for _ in range(5)] == \
        [200, 200, 429, 429, 429]
    resp = client.get("/secret", headers={"API-Key": quiet})
    assert resp.status_code == 200
    assert ratelimit_field(resp)[0] == 1
    assert client.get("/secret", headers={"API-Key": noisy}).status_code == 429
    # Requests without a valid key are refused for what they are, not rate-limited.
    assert client.get("/secret").status_code == 401
    assert client.get("/healthz").status_code == 200


def test_other_routes_share_the_keys_limit(make_app):
    app, store = make_app()
    plaintext, _ = new_key(store, "3/minute")
    client = app.test_client()
    h = {"API-Key": plaintext}
    assert [client.get(p, headers=h).status_code for p in ["/secret", "/data", "/secret"]] == [200] * 3
    assert_rate_limited(client.get("/data", headers=h), 3)


def test_token_requests_count_against_the_parent_key(make_app):
    app, store = make_app()
    plaintext, _ = new_key(store, "4/minute")
    client = app.test_client()
    minted = client.post("/tokens", headers={"API-Key": plaintext}, json={"scopes": ["data:read"]})
    assert minted.status_code == 201  # minting is an authorised request: 1 of 4
    token = minted.get_json()["token"]
    for expected_remaining in [2, 1, 0]:
        resp = client.get("/data", query_string={"token": token})
        assert resp.status_code == 200
        assert resp.headers["RateLimit-Policy"] == '"key";q=4;w=60'
        assert ratelimit_field(resp)[0] == expected_remaining
    assert_rate_limited(client.get("/data", query_string={"token": token}), 4)
    # ... and the key itself is spent too: a token is not a second quota.
    assert_rate_limited(client.get("/secret", headers={"API-Key": plaintext}), 4)
    second = client.post("/tokens", headers={"API-Key": plaintext})
    assert second.status_code == 429


def test_the_admin_api_rate_limit_flows_through(make_app):
    app, store = make_app()
    admin, _ = new_key(store, scopes=["admin"], name="admin")
    client = app.test_client()
    h = {"API-Key": admin}
    created = client.post("/admin/keys", headers=h, json={
        "name": "limited", "scopes": ["secret:read"], "rate_limit": " 3 / minute"})
    assert created.status_code == 201
    body = created.get_json()
    assert body["rate_limit"] == "3/minute"
    assert client.get(f"/admin/keys/{body['id']}", headers=h).get_json()["rate_limit"] == "3/minute"
    listed = {k["id"]: k for k in client.get("/admin/keys", headers=h).get_json()["keys"]}
    assert listed[body["id"]]["rate_limit"] == "3/minute"
    unlimited = client.post("/admin/keys", headers=h, json={"name": "u", "scopes": ["secret:read"]})
    assert unlimited.get_json()["rate_limit"] == "600/minute"  # the default, in force

    codes = [client.get("/secret", headers={"API-Key": body["key"]}).status_code for _ in range(3)]
    assert codes == [200] * 3
    assert_rate_limited(client.get("/secret", headers={"API-Key": body["key"]}), 3)
    assert client.get("/secret", headers={"API-Key": unlimited.get_json()["key"]}).status_code == 200

    # A rotated key keeps its limit.
    rotated = client.post(f"/admin/keys/{body['id']}/rotate", headers=h, json={})
    assert rotated.status_code == 201
    assert rotated.get_json()["rate_limit"] == "3/minute"
    codes = [client.get("/secret", headers={"API-Key": rotated.get_json()["key"]}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]


@pytest.mark.parametrize("bad", ["lots", "3/fortnight", "0/minute", "-1/second", 5, ["1/second"]])
def test_the_admin_api_refuses_a_bad_rate_limit(make_app, bad):
    app, store = make_app()
    admin, _ = new_key(store, scopes=["admin"], name="admin")
    resp = app.test_client().post("/admin/keys", headers={"API-Key": admin}, json={
        "name": "x", "scopes": ["secret:read"], "rate_limit": bad})
    assert resp.status_code == 400
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body = resp.get_json(force=True)
    assert body["code"] == "invalid_request"
    assert "rate_limit" in body["detail"]
    assert store.count() == 1


def test_the_cli_rate_limit_flows_through(env, make_app):
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    result = invoke_cli(env, "create-key", "--name", "cli", "--scope", "secret:read",
                     "--rate-limit", "3/minute", "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert created["rate_limit"] == "3/minute"
    shown = json.loads(invoke_cli(env, "show-key", created["id"], "--json").stdout)
    assert shown["rate_limit"] == "3/minute"

    store = open_store(env["KEYGATE_DATABASE_URL"])
    app, _ = make_app(store=store, INSTANCE_PATH=env["KEYGATE_INSTANCE_PATH"])
    client = app.test_client()
    codes = [client.get("/secret", headers={"API-Key": created["key"]}).status_code for _ in range(3)]
    assert codes == [200] * 3
    assert_rate_limited(client.get("/secret", headers={"API-Key": created["key"]}), 3)
    store.close()

    bad = invoke_cli(env, "create-key", "--name", "bad", "--scope", "secret:read", "--rate-limit", "3/fortnight")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "rate" in bad.stderr.lower()


def test_apps_sharing_an_instance_dir_share_the_limit(make_app, tmp_path):
    """The in-process picture of several workers on one host: one table, one limit."""
    app1, store = make_app(INSTANCE_PATH=str(tmp_path / "host"))
    app2, _ = make_app(store=store, INSTANCE_PATH=str(tmp_path / "host"))
    plaintext, _ = new_key(store, "4/minute")
    clients = [app1.test_client(), app2.test_client()]
    codes = [clients[i % 2].get("/secret", headers={"API-Key": plaintext}).status_code for i in range(10)]
    assert codes == [200] * 4 + [429] * 6


def test_apps_on_one_redis_share_the_limit(make_app, tmp_path, redis_prefix):
    need_redis()
    redis = {"RATELIMIT_STORAGE_URL": REDIS_URL, "RATELIMIT_PREFIX": redis_prefix}
    app1, store = make_app(**redis, INSTANCE_PATH=str(tmp_path / "host1"))
    app2, _ = make_app(store=store, **redis, INSTANCE_PATH=str(tmp_path / "host2"))
    plaintext, key_id = new_key(store, "4/minute")
    clients = [app1.test_client(), app2.test_client()]
    responses = [clients[i % 2].get("/secret", headers={"API-Key": plaintext}) for i in range(10)]
    assert [r.status_code for r in responses] == [200] * 4 + [429] * 6
    assert [ratelimit_field(r)[0] for r in responses[:4]] == [3, 2, 1, 0]
    assert_rate_limited(responses[-1], 4)
    # The key's one cell, where the README says it is.
    import redis as redis_py

    with redis_py.Redis.from_url(REDIS_URL) as client:
        assert client.keys(redis_prefix + "*") == [f"{redis_prefix}rl:key:{{{key_id}}}".encode()]


# -- a limit store that is down ---------------------------------------------------------


def _outage_lines(caplog) -> list[str]:  # noqa: ANN001
    return [r.getMessage() for r in caplog.records
            if r.name == "keygate.backends" and "rate-limit store is unavailable" in r.getMessage()]


def test_an_unreachable_limit_store_fails_closed_by_default(make_app, caplog):
    caplog.set_level(logging.WARNING)
    app, store = make_app(RATELIMIT_STORAGE_URL=UNREACHABLE_REDIS)
    plaintext, _ = new_key(store)
    client = app.test_client()
    for _ in range(5):
        resp = client.get("/secret", headers={"API-Key": plaintext})
        assert resp.status_code == 503
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        body = resp.get_json(force=True)
        assert body["status"] == 503
        assert body["code"] == "rate_limit_unavailable"
        assert resp.headers["Retry-After"] == "5"
        assert "Welcome" not in resp.get_data(as_text=True)
    lines = _outage_lines(caplog)
    assert len(lines) == 1, "one clear line as the outage starts, not one per request"
    assert "KEYGATE_RATELIMIT_FAIL_OPEN" in lines[0] and "503" in lines[0]
    # Nothing else breaks: health checks and unauthenticated refusals still answer.
    assert client.get("/healthz").status_code == 200
    assert client.get("/secret").status_code == 401


def test_an_unreachable_limit_store_fails_open_when_told(make_app, caplog):
    caplog.set_level(logging.WARNING)
    app, store = make_app(RATELIMIT_STORAGE_URL=UNREACHABLE_REDIS, RATELIMIT_FAIL_OPEN="1")
    plaintext, key_id = new_key(store, "1/minute")
    client = app.test_client()
    for _ in range(3):  # the limit can't be checked, so it isn't enforced
        resp = client.get("/secret", headers={"API-Key": plaintext})
        assert resp.status_code == 200
        assert resp.get_json()["message"] == "Welcome to the secret page!"
    lines = _outage_lines(caplog)
    assert lines and "letting requests through" in lines[0]
    # Requests let through are still counted as usage.
    app.extensions["keygate.usage"].flush()
    assert store.get(key_id).use_count == 3


# ---------------------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------------------


def cli_json(env, *args: str):  # noqa: ANN001, ANN201
    result = invoke_cli(env, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fresh_get(server, path: str, key: str):  # noqa: ANN001, ANN201
    """One request on its own connection, so every worker gets its share."""
    with requests.Session() as s:
        return s.get(server.url + path, headers={"API-Key": key, "Connection": "close"}, timeout=10)


def assert_real_429(resp, limit: int) -> None:  # noqa: ANN001
    assert resp.status_code == 429
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.json()["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["RateLimit-Policy"] == f'"key";q={limit};w=60'
    assert int(resp.headers["Retry-After"]) >= ratelimit_field(resp)[1]


@pytest.mark.slow
def test_two_workers_do_not_multiply_the_limit(env, start_server):
    cli_json(env, "init")
    a = cli_json(env, "create-key", "--name", "a", "--scope", "secret:read", "--rate-limit", "5/minute")
    b = cli_json(env, "create-key", "--name", "b", "--scope", "secret:read", "--rate-limit", "10/hour")
    c = cli_json(env, "create-key", "--name", "c", "--scope", "secret:read")
    server = start_server(workers=2)
    wait_for_workers(server, 2)

    sequential = [fresh_get(server, "/secret", a["key"]) for _ in range(8)]
    assert [r.status_code for r in sequential] == [200] * 5 + [429] * 3
    assert_real_429(sequential[-1], 5)

    # Concurrent requests keep both workers busy at once: still exactly the limit.
    with ThreadPoolExecutor(8) as pool:
        codes = Counter(pool.map(lambda _: fresh_get(server, "/secret", b["key"]).status_code, range(30)))
    assert codes == {200: 10, 429: 20}

    assert [fresh_get(server, "/secret", c["key"]).status_code for _ in range(4)] == [200] * 4
    assert fresh_get(server, "/secret", a["key"]).status_code == 429


@pytest.mark.slow
def test_two_servers_on_one_redis_share_the_limit(env, start_server, tmp_path, redis_prefix):
    need_redis()
    cli_json(env, "init")
    shared = cli_json(env, "create-key", "--name", "shared", "--scope", "secret:read", "--rate-limit", "20/minute")
    other = cli_json(env, "create-key", "--name", "other", "--scope", "secret:read", "--rate-limit", "20/minute")
    redis = {"KEYGATE_RATELIMIT_STORAGE_URL": REDIS_URL, "KEYGATE_RATELIMIT_PREFIX": redis_prefix}
    first = start_server(workers=1, env_overrides=redis)
    # A second "host": its own instance dir (so no shared table), the same store.
    (tmp_path / "host2").mkdir()
    second = start_server(workers=1, env_overrides={
        **redis,
        "KEYGATE_INSTANCE_PATH": str(tmp_path / "host2" / "instance"),
        "KEYGATE_DATABASE_URL": env["KEYGATE_DATABASE_URL"],
    })
    servers = [first, second]
    # GCRA gives the 21st request its turn 3 s after the first (60 s / 20): all of this
    # takes a fraction of that.
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(
            lambda i: fresh_get(servers[i % 2], "/secret", shared["key"]), range(40)))
    codes = Counter(r.status_code for r in responses)
    assert codes == {200: 20, 429: 20}
    assert_real_429(next(r for r in responses if r.status_code == 429), 20)
    for s in servers:
        assert fresh_get(s, "/secret", shared["key"]).status_code == 429
        assert fresh_get(s, "/secret", other["key"]).status_code == 200


@pytest.mark.slow
def test_a_server_whose_limit_store_is_down_says_so(env, start_server):
    admin = cli_json(env, "init")["admin_key"]
    password = "never-logged-" + uuid.uuid4().hex
    unreachable = f"redis://:{password}@127.0.0.1:1/0"
    server = start_server(workers=1, env_overrides={"KEYGATE_RATELIMIT_STORAGE_URL": unreachable})
    resp = server.get("/admin", headers={"API-Key": admin["key"]})
    assert resp.status_code == 503
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.json()["status"] == 503
    assert server.get("/healthz").status_code == 200
    output = server.output()
    assert "the rate-limit store is unavailable" in output
    assert "KEYGATE_RATELIMIT_FAIL_OPEN" in output
    assert "Traceback" not in output
    assert password not in output and password not in resp.text
