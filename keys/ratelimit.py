"""Per-key rate limits: one algorithm (GCRA), the same answers on every backend.

GCRA keeps one number per counter, the "theoretical arrival time" (TAT): a full
burst of ``amount`` requests passes, then one per ``period/amount``. Each
backend runs the same step (``gcra_step``: decide, and move the TAT if allowed)
and derives the header values the same way (``limit_state``), so a client sees
the same limits whether an operator runs one host or a fleet:

* ``SharedMemoryLimiter`` — the embedded default: the cells live in an
  ``mmap``-ed file that every worker of the host maps, guarded by ``flock``
  (a process's own memory would let N workers allow N times the limit).
* ``MemoryLimiter`` — ``memory://``: one process's memory, for tests and tools.
* ``RedisLimiter`` (``keys/ratelimit_redis.py``) — ``redis://``: shared by
  every host, the same step as a Lua script, one round trip per hit.

A limiter counts named things in namespaces: ``"key"`` (an API key's id) is
the per-key limit; another namespace (a client address, say) is a counter of
another kind that never collides with a key's. Besides ``hit``, ``peek`` tells
what a hit would answer without counting it, and ``hit_unless`` counts a hit only
if a guard counter (a client address's refused credentials) is not spent — both
in one step: one lock, one round trip.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import re
import struct
import threading
import time
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

from .exc import ConfigError, StoreUnavailable
from .files import private_dir
from .forking import after_fork_in_child
from .parse import RateLimit

log = logging.getLogger("keygate.ratelimit")

KEY_NAMESPACE = "key"
_NAMESPACE_RE = re.compile(r"[a-z][a-z0-9_-]{0,15}")  # fits blake2b's 16-byte personalisation


class LimitState(NamedTuple):
    """The outcome of one hit, in the terms of the IETF RateLimit header fields."""

    allowed: bool
    limit: RateLimit
    remaining: int
    reset: int  # seconds until the quota is fully available again
    retry_after: int  # seconds until the next request would pass (0 when allowed)


class Counter(NamedTuple):
    """One counter: ``name`` in ``namespace``, against ``limit``."""

    name: str
    limit: RateLimit
    namespace: str = KEY_NAMESPACE


class RateLimitUnavailable(StoreUnavailable):
    code = "rate_limit_unavailable"
    title = "Rate limit store unavailable"


class Limiter(ABC):
    @abstractmethod
    def hit(self, name: str, limit: RateLimit, now: float | None = None,
            namespace: str = KEY_NAMESPACE) -> LimitState:
        """Count one request for ``name`` (in ``namespace``) against ``limit``; refused
        hits are not counted. ``now`` (seconds since the epoch) is for tests that drive
        the clock; by default the backend's own clock decides."""

    @abstractmethod
    def peek(self, name: str, limit: RateLimit, now: float | None = None,
             namespace: str = KEY_NAMESPACE) -> LimitState:
        """What ``hit`` would answer now, counting nothing."""

    def hit_unless(self, name: str, limit: RateLimit, guard: Counter, now: float | None = None,
                   namespace: str = KEY_NAMESPACE) -> tuple[LimitState | None, LimitState | None]:
        """Peek at ``guard``; only if a hit on it would pass, count one for ``name``.
        Returns ``(the guard's state, None)`` when the guard refused, else ``(None, name's state)``.

        The backends here do both in one step; this fallback (for other limiters) in two."""
        checked = self.peek(guard.name, guard.limit, now, guard.namespace)
        if not checked.allowed:
            return checked, None
        return None, self.hit(name, limit, now, namespace)

    def ping(self) -> None:
        """Raise ``RateLimitUnavailable`` if the limit store doesn't answer (readiness
        probes); a table in this host's memory always does."""

    def close(self) -> None:
        pass


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"rate-limit namespace {namespace!r}: use 1-16 of a-z, 0-9, _ and -, "
                         "starting with a letter")
    return namespace


# -- the algorithm: every backend runs exactly these steps ---------------------------
# The Lua script in ratelimit_redis.py repeats gcra_step operation for operation (IEEE
# doubles on both sides), so both give bit-identical answers; change them together.


def gcra_step(tat: float, now: float, period: float, interval: float) -> tuple[bool, float, float]:
    """One hit on a cell whose TAT is ``tat``: (allowed, the TAT to store if allowed,
    how far that TAT is ahead of ``now``).

    A TAT in the past is a full quota. One further ahead than a whole period (the key's
    limit was lowered, or the cell holds junk) counts as a spent burst under the
    current limit, so a changed limit applies at once and nothing waits longer than
    one period. ``not tat >= now`` also catches NaN.
    """
    if not tat >= now:
        tat = now
    elif tat > now + period:
        tat = now + period
    new_tat = tat + interval
    ahead = new_tat - now
    return ahead <= period + 1e-9, new_tat, ahead


def limit_state(allowed: bool, ahead: float, limit: RateLimit, interval: float) -> LimitState:
    """The header values of a hit, from its outcome and how far its TAT is ahead of now."""
    if allowed:
        remaining = int((limit.period - ahead) / interval + 1e-9)
        return LimitState(True, limit, remaining, math.ceil(ahead), 0)
    # Refused: the quota is back (one request) after ``retry``; RateLimit's t says so too.
    retry = max(1, math.ceil(ahead - limit.period))
    return LimitState(False, limit, 0, retry, retry)


# -- embedded: GCRA cells in shared memory ---------------------------------------------

_MAGIC = b"KGRL0003"  # 0003: the header keeps _HOT (0002 had the slot count, 0001 neither)
_HEADER = 64
# The latest TAT stored in any counter outside the keys' namespace (refused credentials per
# address): while it is not ahead of now, no such counter can refuse anything, so a key's hit
# skips reading its guard. One double in the header, written under the table's lock.
_HOT = struct.Struct("<d")
_HOT_AT = 16
_SLOT = struct.Struct("<16sd")  # cell name (NUL-padded), theoretical arrival time
_PROBES = 16
_NEVER_WRITTEN = bytes(16)
_MAX_CELLS = 100_000  # per-process memo of where cells live; a full memo starts over


class SharedMemoryLimiter(Limiter):
    """GCRA cells in an mmap-ed file shared by all processes that open the same path.

    The table holds ``slots`` cells at a time; a cell whose time has passed is a
    full quota and may be reused, so only counters used within their window
    compete for space. When every probed cell is busy the oldest is evicted, which
    can only ever favour the caller (never wrongly refuse one).
    """

    def __init__(self, path: str | os.PathLike[str], slots: int = 1 << 16) -> None:
        self.path = Path(path)
        self.slots = slots
        self._size = _HEADER + slots * _SLOT.size
        self._header = _MAGIC + struct.pack("<Q", slots)  # the layout, checked on open
        self._fd = _open_table(self.path, self._size, self._header)
        try:
            self._map = mmap.mmap(self._fd, self._size)
        except OSError:
            os.close(self._fd)
            raise
        self._thread_lock = threading.Lock()  # flock does not exclude threads of one process
        self._memo_lock = threading.Lock()  # its own: a guard's cell is looked up under the other
        self._memos: dict[str, dict[str, list[Any]]] = {}
        after_fork_in_child(self._after_fork)

    def _after_fork(self) -> None:
        """A forked child opens the table again: ``flock`` locks belong to the open file
        description, which parent and child would otherwise share, and then exclude nobody."""
        self._thread_lock = threading.Lock()  # possibly held by a parent thread at the fork
        self._memo_lock = threading.Lock()
        if self._map.closed:
            return
        inherited = self._fd
        try:
            self._fd = _open_table(self.path, self._size, self._header)
            if os.fstat(self._fd).st_ino != os.fstat(inherited).st_ino:  # replaced meanwhile
                self._map.close()
                self._map = mmap.mmap(self._fd, self._size)
        finally:
            os.close(inherited)

    def hit(self, name: str, limit: RateLimit, now: float | None = None,
            namespace: str = KEY_NAMESPACE) -> LimitState:
        cell = self._cell(name, namespace)
        period = limit.period
        interval = period / limit.amount
        now = time.time() if now is None else now
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                allowed, ahead = self._step(cell, now, period, interval, True)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return limit_state(allowed, ahead, limit, interval)

    def peek(self, name: str, limit: RateLimit, now: float | None = None,
             namespace: str = KEY_NAMESPACE) -> LimitState:
        cell = self._cell(name, namespace)
        interval = limit.period / limit.amount
        now = time.time() if now is None else now
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            try:
                allowed, ahead = self._step(cell, now, limit.period, interval, False)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return limit_state(allowed, ahead, limit, interval)

    def hit_unless(self, name: str, limit: RateLimit, guard: Counter, now: float | None = None,
                   namespace: str = KEY_NAMESPACE) -> tuple[LimitState | None, LimitState | None]:
        cell = self._cell(name, namespace)
        # Every authenticated request comes here; a guard outside the keys' namespace is read
        # only while some such counter is ahead of now (``_HOT``): a fifth of the request's
        # rate-limit work otherwise (bench/bench_instructions.py).
        guard_cell = self._cell(guard.name, guard.namespace) if guard.namespace == KEY_NAMESPACE else None
        period = limit.period
        interval = period / limit.amount
        now = time.time() if now is None else now
        allowed, ahead = False, 0.0
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                if guard_cell is None and _HOT.unpack_from(self._map, _HOT_AT)[0] <= now:
                    passed = True  # no guard's TAT is ahead of now: every one has its burst to spare
                else:
                    passed, guard_ahead = self._step(guard_cell or self._cell(guard.name, guard.namespace), now,
                                                     guard.limit.period, guard.limit.period / guard.limit.amount,
                                                     False)
                if passed:
                    allowed, ahead = self._step(cell, now, period, interval, True)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        if not passed:
            return limit_state(False, guard_ahead, guard.limit, guard.limit.period / guard.limit.amount), None
        return None, limit_state(allowed, ahead, limit, interval)

    def _step(self, cell: list[Any], now: float, period: float, interval: float,
              count: bool) -> tuple[bool, float]:
        """``gcra_step`` on ``cell``, stored if ``count`` and allowed; the caller holds the locks."""
        cell_name, start, hint, _ = cell
        stored, tat = _SLOT.unpack_from(self._map, hint)
        if stored != cell_name:  # moved, evicted, or never stored: look for it
            hint, tat = self._find(cell_name, start, now)
            cell[2] = hint
        allowed, new_tat, ahead = gcra_step(tat, now, period, interval)
        if allowed and count:
            _SLOT.pack_into(self._map, hint, cell_name, new_tat)
            if cell[3] and not _HOT.unpack_from(self._map, _HOT_AT)[0] >= new_tat:  # (NaN: junk, replaced)
                _HOT.pack_into(self._map, _HOT_AT, new_tat)
        return allowed, ahead

    def _cell(self, name: str, namespace: str) -> list[Any]:
        """``[cell name, first probe offset, last known offset, outside the keys' namespace]``
        for a counter, kept per process so a hit skips the encoding, the hash and (usually)
        the probing."""
        memo = self._memos.get(namespace)
        if memo is None:
            memo = self._memos.setdefault(check_namespace(namespace), {})
        cell = memo.get(name)
        if cell is not None:
            return cell
        raw = name.encode()
        if namespace != KEY_NAMESPACE:  # a name of its own kind, so it never meets a key's
            raw = hashlib.blake2b(raw, digest_size=16, person=namespace.encode()).digest()
        elif len(raw) > 16:  # cells hold 16 bytes; longer ids (other apps' keys) are hashed
            raw = hashlib.blake2b(raw, digest_size=16).digest()
        start = zlib.crc32(raw) % self.slots
        raw = raw.ljust(16, b"\0")
        cell = [raw, start, _HEADER + start * _SLOT.size, namespace != KEY_NAMESPACE]
        with self._memo_lock:
            if len(memo) >= _MAX_CELLS:
                memo.clear()
            memo[name] = cell
        return cell

    def _find(self, name: bytes, start: int, now: float) -> tuple[int, float]:
        """The cell for ``name`` (its stored time) or a free/oldest one (time 0).

        A never-written slot ends the search: cells go into the first free slot of their
        sequence and are never removed, so none lies beyond one. (Counters that are only
        ever peeked, such as a well-behaved client's refused credentials, cost one probe.)"""
        victim, victim_tat = -1, math.inf
        for i in range(_PROBES):
            offset = _HEADER + ((start + i) % self.slots) * _SLOT.size
            stored, tat = _SLOT.unpack_from(self._map, offset)
            if stored == name:
                return offset, tat
            if stored == _NEVER_WRITTEN:
                return (offset if victim_tat > 0 else victim), 0.0
            if tat <= now or not stored.strip(b"\0"):
                if victim_tat > 0:  # the first free cell wins over any busy one
                    victim, victim_tat = offset, 0.0
            elif tat < victim_tat:
                victim, victim_tat = offset, tat
        return victim, 0.0

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            os.close(self._fd)


def _open_table(path: Path, size: int, header: bytes) -> int:
    """A descriptor of the table at ``path`` with this layout, creating it if need be.

    A missing, damaged or differently laid-out file is replaced by a fresh one renamed
    into place, never truncated: another process may have the old one mapped, and a
    mapping past the end of a shrunk file is SIGBUS. ``<path>.lock`` serialises the
    replacement, so processes starting together agree on one table.
    """
    private_dir(path.parent)  # the table holds key ids: 0700 directory, 0600 files
    lock = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        if fd >= 0:
            if os.fstat(fd).st_size == size and os.pread(fd, len(header), 0) == header:
                return fd
            os.close(fd)
        fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
        fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, header, 0)
            os.replace(fresh, path)
        except OSError:
            os.close(fd)
            raise
        return fd
    finally:
        os.close(lock)  # releases the flock


# -- one process's memory ----------------------------------------------------------------


class MemoryLimiter(Limiter):
    """GCRA cells in a dict (``memory://``): private to one process, so every worker of a
    server would count on its own — for tests and single-process tools."""

    def __init__(self) -> None:
        self._tats: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def hit(self, name: str, limit: RateLimit, now: float | None = None,
            namespace: str = KEY_NAMESPACE) -> LimitState:
        if namespace != KEY_NAMESPACE:
            check_namespace(namespace)
        period = limit.period
        interval = period / limit.amount
        now = time.time() if now is None else now
        with self._lock:
            allowed, ahead = self._step((namespace, name), now, period, interval, True)
        return limit_state(allowed, ahead, limit, interval)

    def peek(self, name: str, limit: RateLimit, now: float | None = None,
             namespace: str = KEY_NAMESPACE) -> LimitState:
        check_namespace(namespace)
        interval = limit.period / limit.amount
        now = time.time() if now is None else now
        with self._lock:
            allowed, ahead = self._step((namespace, name), now, limit.period, interval, False)
        return limit_state(allowed, ahead, limit, interval)

    def hit_unless(self, name: str, limit: RateLimit, guard: Counter, now: float | None = None,
                   namespace: str = KEY_NAMESPACE) -> tuple[LimitState | None, LimitState | None]:
        check_namespace(guard.namespace)
        check_namespace(namespace)
        guard_interval = guard.limit.period / guard.limit.amount
        interval = limit.period / limit.amount
        now = time.time() if now is None else now
        allowed, ahead = False, 0.0
        with self._lock:
            passed, guard_ahead = self._step((guard.namespace, guard.name), now, guard.limit.period,
                                             guard_interval, False)
            if passed:
                allowed, ahead = self._step((namespace, name), now, limit.period, interval, True)
        if not passed:
            return limit_state(False, guard_ahead, guard.limit, guard_interval), None
        return None, limit_state(allowed, ahead, limit, interval)

    def _step(self, cell: tuple[str, str], now: float, period: float, interval: float,
              count: bool) -> tuple[bool, float]:
        allowed, new_tat, ahead = gcra_step(self._tats.get(cell, now), now, period, interval)
        if allowed and count:
            self._tats[cell] = new_tat
            if len(self._tats) > _MAX_CELLS:  # forget full quotas, as Redis expires them
                self._tats = {c: t for c, t in self._tats.items() if t > now}
        return allowed, ahead


# -- choosing a backend ------------------------------------------------------------------

REDIS_SCHEMES = ("redis", "rediss", "redis+unix")


def open_limiter(storage_url: str | None, instance_path: str | os.PathLike[str],
                 prefix: str = "keygate:") -> Limiter:
    """``None`` → the embedded shared-memory limiter for this host; ``memory://`` → this
    process's memory; ``redis://…`` → Redis, every key under ``prefix``."""
    if storage_url is None:
        # The layout is in the name: a keygate with another layout (an upgrade running
        # beside the old one) uses its own table instead of replacing one in use.
        return SharedMemoryLimiter(Path(instance_path) / f"ratelimits-{_MAGIC.decode()[4:]}.mmap")
    scheme = storage_url.split("://", 1)[0] if "://" in storage_url else ""
    if scheme == "memory":
        return MemoryLimiter()
    if scheme in REDIS_SCHEMES:
        from .ratelimit_redis import RedisLimiter

        return RedisLimiter(storage_url, prefix=prefix)
    raise ConfigError(f"unknown rate-limit storage {scheme or storage_url[:30]!r}; use redis://host:port")
