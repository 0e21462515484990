"""Redis for tests: a prefix of one's own on the shared server, or a private server to break.

The machine's Redis (127.0.0.1:6379) is shared: tests write only under a prefix of
their own and delete only that. Outages are played on a private ``redis-server``
(its own port, no persistence) that a test kills, pauses and restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import REDIS_URL, REQUIRE_SERVICES, free_port


def test_prefix() -> str:
    """A Redis key prefix no other test run uses."""
    return f"kgtest:{uuid.uuid4().hex[:12]}:"


test_prefix.__test__ = False  # a helper, not a test


def forget_prefix(prefix: str, url: str = REDIS_URL) -> None:
    """Delete every key under ``prefix`` (and nothing else)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for name in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(name)
    finally:
        client.close()


class PrivateRedis:
    """A ``redis-server`` on a free port of its own, started, killed, paused and restarted
    by the test that owns it."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed"
            if REQUIRE_SERVICES:
                pytest.fail(message + " and KEYGATE_REQUIRE_SERVICES=1", pytrace=False)
            pytest.skip(message)
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:  # not listening yet
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def kill(self) -> None:
        """SIGKILL: connections drop, everything in memory (scripts, cells) is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def script_loads(self) -> int:
        """How many times a client sent ``SCRIPT LOAD`` since this server started."""
        with self.client() as c:
            stats = c.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_script"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()  # a paused server ignores SIGTERM until continued
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
