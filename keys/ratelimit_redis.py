"""GCRA in Redis: one ``EVALSHA`` per hit decides it and returns what the headers need.

Hand-written because no maintained library offers it: ``limits`` (5.8) has moving,
fixed and sliding windows only, each needing a second call for the window's state
(and Redis' own ``GCRA`` command arrives only with Redis 8.8).

The script is ``gcra_step`` of ``keys/ratelimit.py`` in Lua, operation for operation on
the same IEEE doubles, so a fleet on Redis answers exactly as one host's embedded
table would. Time comes from Redis (``TIME``), so hosts whose clocks disagree still
agree on every limit. Each thread sends ``EVALSHA`` on a redis-py connection of its
own and, when Redis answers ``NOSCRIPT`` (first use, a restart, a failover), loads
the script and repeats the call once.

``peek`` and ``hit_unless`` (a key's hit, counted only while its client address has
refused credentials to spare) run the same script, also in one round trip. ``hit_unless``
touches two counters with different hash tags, so it needs one Redis (or a
Sentinel-managed primary), not a Redis Cluster.

Layout: one string per counter, ``<prefix>rl:<namespace>:{<name>}`` (a key's cell:
``keygate:rl:key:{<key id>}``), holding its theoretical arrival time. The braces
are a Redis Cluster hash tag: everything about one name stays on one slot. Every
write sets an expiry at that time, when the cell would be a full quota anyway, so
idle counters cost no memory.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import urlsplit

from .exc import ConfigError
from .forking import after_fork_in_child
from .parse import RateLimit
from .ratelimit import KEY_NAMESPACE, Counter, Limiter, LimitState, RateLimitUnavailable, check_namespace, limit_state

#: Budget of connecting, and of one answer: a Redis that is down or hung must cost the
#: request under a second (then 503, or fail-open), never the client's default minutes.
TIMEOUT = 0.5

_PREFIX_RE = re.compile(r"[!-z|~]{1,64}")  # printable ASCII but space and braces (hash tags)

# KEYS[1]: the counter; KEYS[2], if given: a guard, peeked first and never written.
# ARGV: the counter's period and interval, the test clock or '', 'hit' or 'peek', the
# guard's period and interval. Returns {allowed, ahead} for the counter, or
# {0, the guard's ahead, 'guard'} when the guard is spent (nothing counted).
GCRA_LUA = """
local now, slack = tonumber(ARGV[3]), 0
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  slack = 3600000  -- the clock of a test: the real one must not expire the cell meanwhile
end
local function step(key, period, interval)  -- gcra_step: the TAT to store, how far ahead, allowed
  local tat = tonumber(redis.call('GET', key)) or now
  if not (tat >= now) then tat = now elseif tat > now + period then tat = now + period end
  local new_tat = tat + interval
  local ahead = new_tat - now
  return new_tat, ahead, ahead <= period + 1e-9
end
if KEYS[2] then
  local _, gahead, gallowed = step(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]))
  if not gallowed then return {0, string.format('%.17g', gahead), 'guard'} end
end
local new_tat, ahead, allowed = step(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if not allowed then return {0, string.format('%.17g', ahead)} end
if ARGV[4] ~= 'peek' then
  local ttl = math.max(1, math.ceil(ahead * 1000)) + slack
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl)
end
return {1, string.format('%.17g', ahead)}
"""


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start keygate's Redis keys; else ValueError saying why."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"{str(prefix)[:70]!r} is not a key prefix: use 1-64 printable ASCII "
                         "characters without spaces or braces, e.g. keygate:")
    return prefix


def _check_url(url: str) -> None:
    """What redis-py would let through to fail (or worse, quietly fall back) at the first
    request. Messages never repeat the URL: it may hold a password."""
    if not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError("the URL holds spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("redis+unix:// needs the socket's path, e.g. redis+unix:///run/redis.sock")
        return
    parts.port  # noqa: B018 -- raises ValueError for a port that is not one
    db = parts.path.strip("/")
    if db and not db.isdigit():  # redis-py would quietly use database 0
        raise ValueError(f"the database is a number, as in redis://host:6379/0, not {db[:20]!r}")


class RedisLimiter(Limiter):
    """GCRA cells in Redis, shared by every host that uses the same server and prefix."""

    def __init__(self, url: str, prefix: str = "keygate:", timeout: float = TIMEOUT) -> None:
        try:
            check_prefix(prefix)
        except ValueError as e:
            raise ConfigError(f"rate-limit key prefix: {e}") from None
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ConfigError("redis:// needs the redis package "
                              "(pip install 'keygate[redis]')") from None
        if url.startswith("redis+unix://"):  # the scheme keygate has always accepted
            url = "unix://" + url[len("redis+unix://"):]
        try:
            _check_url(url)
            self._client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout,
                protocol=2,  # RESP3 buys nothing here, and redis-py parses RESP2 faster without hiredis
                # Once, at once, and only for a dropped connection (a restarted Redis): a
                # timeout means a hung Redis, and waiting for it twice would double the cost.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from None
        self._redis = redis
        self._sha = _sha1(GCRA_LUA)
        self.prefix = prefix
        self._heads: dict[str, str] = {}
        self._args: dict[RateLimit, tuple[bytes, bytes]] = {}
        # A connection per thread, used directly: redis-py's client facade (pool checkout,
        # retry wrapper, command dispatch) doubled the CPU of a hit (33 → 16 µs, bench/).
        self._local = threading.local()
        self._connections: set[Any] = set()
        self._lock = threading.Lock()
        after_fork_in_child(self._after_fork)

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._client.connection_pool.make_connection()
            with self._lock:
                self._connections.add(conn)
        return conn

    def _evalsha(self, keys: tuple[str, ...], args: tuple[bytes, ...]) -> Any:
        redis = self._redis
        conn = self._connection()
        for attempt in (1, 2):
            try:
                try:
                    conn.send_command("EVALSHA", self._sha, len(keys), *keys, *args)
                    return conn.read_response()
                except redis.exceptions.NoScriptError:  # first use, or Redis lost its scripts
                    conn.send_command("SCRIPT", "LOAD", GCRA_LUA)
                    conn.read_response()
                    conn.send_command("EVALSHA", self._sha, len(keys), *keys, *args)
                    return conn.read_response()
            except redis.ConnectionError:
                conn.disconnect()  # reconnects on the next command
                if attempt == 2:  # once, at once: a dropped connection (a restarted Redis)
                    raise
            except redis.RedisError:
                conn.disconnect()  # a timeout may leave an answer in flight: start clean
                raise
        raise AssertionError("unreachable")

    def _after_fork(self) -> None:
        # A forked child must never talk on (or close) its parent's connections.
        self._local = threading.local()
        self._connections = set()
        self._lock = threading.Lock()

    def cell(self, name: str, namespace: str = KEY_NAMESPACE) -> str:
        """The Redis key of ``name``'s counter in ``namespace``."""
        head = self._heads.get(namespace)
        if head is None:
            head = self._heads[check_namespace(namespace)] = f"{self.prefix}rl:{namespace}:{{"
        return head + name + "}"

    def _limit_args(self, limit: RateLimit) -> tuple[bytes, bytes]:
        fixed = self._args.get(limit)
        if fixed is None:  # repr: the shortest text that parses back to the same double
            interval = limit.period / limit.amount
            fixed = self._args[limit] = (str(limit.period).encode(), repr(interval).encode())
        return fixed

    def _run(self, keys: tuple[str, ...], args: tuple[bytes, ...]) -> Any:
        try:
            return self._evalsha(keys, args)
        except self._redis.RedisError as e:
            raise RateLimitUnavailable(f"the rate-limit store is unreachable ({type(e).__name__})") from e

    def hit(self, name: str, limit: RateLimit, now: float | None = None,
            namespace: str = KEY_NAMESPACE) -> LimitState:
        allowed, ahead = self._run((self.cell(name, namespace),), (*self._limit_args(limit), _clock(now), b"hit"))
        return limit_state(allowed == 1, float(ahead), limit, limit.period / limit.amount)

    def peek(self, name: str, limit: RateLimit, now: float | None = None,
             namespace: str = KEY_NAMESPACE) -> LimitState:
        allowed, ahead = self._run((self.cell(name, namespace),), (*self._limit_args(limit), _clock(now), b"peek"))
        return limit_state(allowed == 1, float(ahead), limit, limit.period / limit.amount)

    def hit_unless(self, name: str, limit: RateLimit, guard: Counter, now: float | None = None,
                   namespace: str = KEY_NAMESPACE) -> tuple[LimitState | None, LimitState | None]:
        keys = (self.cell(name, namespace), self.cell(guard.name, guard.namespace))
        answer = self._run(keys, (*self._limit_args(limit), _clock(now), b"hit", *self._limit_args(guard.limit)))
        if len(answer) == 3:  # the guard is spent
            return limit_state(False, float(answer[1]), guard.limit, guard.limit.period / guard.limit.amount), None
        return None, limit_state(answer[0] == 1, float(answer[1]), limit, limit.period / limit.amount)

    def ping(self) -> None:
        try:
            self._client.ping()
        except self._redis.RedisError as e:
            raise RateLimitUnavailable(f"the rate-limit store is unreachable ({type(e).__name__})") from e

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.disconnect()
        self._local = threading.local()
        self._client.close()


def _clock(now: float | None) -> bytes:
    """The script's clock argument: empty for Redis' own ``TIME``, else a test's clock
    (``repr``: the shortest text that parses back to the same double)."""
    return b"" if now is None else repr(float(now)).encode()


def _sha1(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts by SHA-1
