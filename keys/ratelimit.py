"""Per-key rate limits: exact, cheap, and shared by every worker that must share them.

Two backends behind one small interface:

* ``SharedMemoryLimiter`` — the embedded default. ``limits``' in-memory storage
  is private to one process, so gunicorn with N workers would allow N times the
  limit. This keeps one GCRA cell (a single float, the "theoretical arrival
  time") per key in an ``mmap``-ed file that every worker of the host maps,
  guarded by ``flock``. GCRA lets a full burst of ``amount`` through, then one
  request per ``period/amount``; it is exact under concurrency and costs a few
  microseconds (see ``bench/``).
* ``LimitsLimiter`` — the ``limits`` library's moving window on any storage it
  supports; ``redis://`` shares limits across hosts.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time
import weakref
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

from .exc import ConfigError, StoreUnavailable
from .files import private_dir
from .parse import RateLimit

log = logging.getLogger("keygate.ratelimit")


class LimitState(NamedTuple):
    """The outcome of one hit, in the terms of the IETF RateLimit header fields."""

    allowed: bool
    limit: RateLimit
    remaining: int
    reset: int  # seconds until the quota is fully available again
    retry_after: int  # seconds until the next request would pass (0 when allowed)


class RateLimitUnavailable(StoreUnavailable):
    code = "rate_limit_unavailable"
    title = "Rate limit store unavailable"


class Limiter(ABC):
    @abstractmethod
    def hit(self, key_id: str, limit: RateLimit, now: float | None = None) -> LimitState:
        """Count one request for ``key_id`` against ``limit``; refused hits are not counted."""

    def close(self) -> None:
        pass


# -- embedded: GCRA in shared memory ---------------------------------------------

_MAGIC = b"KGRL0002"  # 0002: the slot count follows in the header (0001 had none)
_HEADER = 64
_SLOT = struct.Struct("<16sd")  # key id (NUL-padded), theoretical arrival time
_PROBES = 16
_MAX_CELLS = 100_000  # per-process memo of where keys live; a full memo starts over


class SharedMemoryLimiter(Limiter):
    """GCRA cells in an mmap-ed file shared by all processes that open the same path.

    The table holds ``slots`` keys at a time; a cell whose time has passed is a
    full quota and may be reused, so only keys used within their window compete
    for space. When every probed cell is busy the oldest is evicted, which can
    only ever favour the caller (never wrongly refuse one).
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
        self._cells: dict[str, list] = {}
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (r := ref()) is not None and r._after_fork())

    def _after_fork(self) -> None:
        """A forked child opens the table again: ``flock`` locks belong to the open file
        description, which parent and child would otherwise share, and then exclude nobody."""
        self._thread_lock = threading.Lock()  # possibly held by a parent thread at the fork
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

    def hit(self, key_id: str, limit: RateLimit, now: float | None = None) -> LimitState:
        cell = self._cells.get(key_id) or self._cell(key_id)
        name, start, hint = cell
        period = limit.period
        interval = period / limit.amount
        now = time.time() if now is None else now
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                stored, tat = _SLOT.unpack_from(self._map, hint)
                if stored != name:  # moved, evicted, or never stored: look for it
                    hint, tat = self._find(name, start, now)
                    cell[2] = hint
                new_tat = (tat if tat > now else now) + interval
                allowed = new_tat - now <= period + 1e-9
                if allowed:
                    _SLOT.pack_into(self._map, hint, name, new_tat)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        if allowed:
            remaining = int((period - (new_tat - now)) / interval + 1e-9)
            return LimitState(True, limit, remaining, math.ceil(new_tat - now), 0)
        # Refused: the quota is back (one request) after ``retry``; RateLimit's t says so too.
        retry = max(1, math.ceil(new_tat - period - now))
        return LimitState(False, limit, 0, retry, retry)

    def _cell(self, key_id: str) -> list:
        """``[cell name, first probe offset, last known offset]`` for a key, kept per process
        so a hit skips the encoding, the hash and (usually) the probing."""
        name = key_id.encode()
        if len(name) > 16:  # cells hold 16 bytes; longer ids (other apps' keys) are hashed
            name = hashlib.blake2b(name, digest_size=16).digest()
        start = zlib.crc32(name) % self.slots
        name = name.ljust(16, b"\0")
        cell = [name, start, _HEADER + start * _SLOT.size]
        with self._thread_lock:
            if len(self._cells) >= _MAX_CELLS:
                self._cells.clear()
            self._cells[key_id] = cell
        return cell

    def _find(self, name: bytes, start: int, now: float) -> tuple[int, float]:
        """The cell for ``name`` (its stored time) or a free/oldest one (time 0)."""
        victim, victim_tat = -1, math.inf
        for i in range(_PROBES):
            offset = _HEADER + ((start + i) % self.slots) * _SLOT.size
            stored, tat = _SLOT.unpack_from(self._map, offset)
            if stored == name:
                return offset, tat
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


# -- the limits library (Redis, or one process's memory) ----------------------------


class LimitsLimiter(Limiter):
    """``limits``' exact moving window on a storage URL (``redis://…``, ``memory://``)."""

    def __init__(self, storage_url: str) -> None:
        from limits import RateLimitItemPerDay, RateLimitItemPerHour, RateLimitItemPerMinute, RateLimitItemPerSecond
        from limits.storage import storage_from_string
        from limits.strategies import MovingWindowRateLimiter

        self._items_by_unit = {
            "second": RateLimitItemPerSecond, "minute": RateLimitItemPerMinute,
            "hour": RateLimitItemPerHour, "day": RateLimitItemPerDay,
        }
        self._items: dict[RateLimit, object] = {}
        try:
            options: dict[str, float] = {}
            if storage_url.startswith(("redis://", "rediss://", "redis+unix://")):
                # On the request path: an unresponsive Redis must cost a second, not the
                # client's default minutes, before the request is answered (503 or fail-open).
                options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
            self.storage = storage_from_string(storage_url, **options)
        except Exception as e:  # limits raises ConfigurationError/ImportError variously
            raise ConfigError(f"KEYGATE_RATELIMIT_STORAGE_URL: {e}") from None
        self.limiter = MovingWindowRateLimiter(self.storage)

    def hit(self, key_id: str, limit: RateLimit, now: float | None = None) -> LimitState:
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = self._items_by_unit[limit.unit](limit.amount)
        try:
            allowed = self.limiter.hit(item, "keygate", key_id)
            stats = self.limiter.get_window_stats(item, "keygate", key_id)
        except Exception as e:
            raise RateLimitUnavailable(f"the rate-limit store is unreachable ({type(e).__name__})") from e
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        if allowed:
            return LimitState(True, limit, stats.remaining, reset, 0)
        return LimitState(False, limit, 0, reset, max(1, reset))


def open_limiter(storage_url: str | None, instance_path: str | os.PathLike[str]) -> Limiter:
    """``None`` → the embedded shared-memory limiter for this host; else ``limits``."""
    if storage_url is None:
        # The layout is in the name: a keygate with another layout (an upgrade running
        # beside the old one) uses its own table instead of replacing one in use.
        return SharedMemoryLimiter(Path(instance_path) / f"ratelimits-{_MAGIC.decode()[4:]}.mmap")
    return LimitsLimiter(storage_url)
