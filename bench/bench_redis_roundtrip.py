#!/usr/bin/env python3
"""What one Redis round trip costs on this machine, against the budget issue 17 allows.

Issue 17 asks a server on the Redis limiter for 0.85× the req/s of the embedded one, on the
same two cores that run redis-server. Everything Redis adds to a request (the worker's side
of the round trip and redis-server's) must then fit in ``cost / 0.85 - cost`` of the embedded
setup's CPU per request. This prints, per command and measured in the same run:

* the floor: a ``GET``'s bytes sent and its answer read on a plain blocking socket, no client
  library (what no Python client can go below);
* wall time, the caller's CPU and redis-server's CPU, for a plain ``GET``, an ``EVALSHA`` of
  a script that does nothing, and keygate's GCRA script as a request runs it (``hit_unless``,
  two cells), one command per round trip;
* the GCRA script with 4 and 8 commands per write (pipelined, as a worker could send the
  hits of the requests it has in flight), to show what amortising the round trip buys.

    python bench/bench_redis_roundtrip.py [--commands 20000] [--embedded-us 332]

``--embedded-us``: server CPU per request of SQLite + embedded limiter, as
``bench_limits.py`` printed it in the same hour (default: its figure on the AMD VM in
bench/README.md); the budget line uses it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_limits import cpu_seconds, private_redis  # bench/ is on sys.path

from keys.ratelimit_redis import GCRA_LUA

TARGET = 0.85
CELLS = ("keygate:rl:key:{AbCdEfGh1234}", "keygate:rl:authfail:{127.0.0.1}")
# A limit never reached (100,000,000/minute) and the throttle's default (30/minute), Redis' clock.
GCRA_ARGS = (b"60", repr(60 / 100_000_000).encode(), b"", b"hit", b"60", b"2.0")


def measure(send: Callable[[int], None], n: int, redis_pid: int) -> tuple[float, float, float]:
    """(wall, caller CPU, redis-server CPU), µs per command, for ``send(n)``."""
    server0, cpu0, wall0 = cpu_seconds(redis_pid), time.process_time(), time.perf_counter()
    send(n)
    server1, cpu1, wall1 = cpu_seconds(redis_pid), time.process_time(), time.perf_counter()
    return ((wall1 - wall0) / n * 1e6, (cpu1 - cpu0) / n * 1e6, (server1 - server0) / n * 1e6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=20_000, help="commands per series")
    parser.add_argument("--embedded-us", type=float, default=332.0,
                        help="server CPU µs per request of SQLite + embedded (bench_limits.py)")
    args = parser.parse_args(argv)
    n = max(8, args.commands // 8 * 8)

    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as (url, pid):
        client = redis.Redis.from_url(url, protocol=2)
        gcra, nothing = client.script_load(GCRA_LUA), client.script_load("return 1")
        conn = client.connection_pool.make_connection()  # what RedisLimiter uses: no pool, no retry
        conn.connect()

        def one_at_a_time(*command: object) -> Callable[[int], None]:
            def send(count: int) -> None:
                for _ in range(count):
                    conn.send_command(*command)
                    conn.read_response()
            return send

        def pipelined(depth: int, *command: object) -> Callable[[int], None]:
            packed = conn.pack_commands([command] * depth)

            def send(count: int) -> None:
                for _ in range(count // depth):
                    conn.send_packed_command(packed)
                    for _ in range(depth):
                        conn.read_response()
            return send

        # The floor under any client library: the same GET's bytes on a plain blocking socket.
        host, port = conn.host, conn.port
        raw = socket.create_connection((host, port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        get = conn.pack_command("GET", "bench:nothing")[0]

        def raw_socket(count: int) -> None:
            for _ in range(count):
                raw.sendall(get)
                raw.recv(512)

        hit_unless = ("EVALSHA", gcra, 2, *CELLS, *GCRA_ARGS)
        series = [
            ("GET, raw socket (no client library)", raw_socket),
            ("GET, one per round trip", one_at_a_time("GET", "bench:nothing")),
            ("EVALSHA 'return 1', one per round trip", one_at_a_time("EVALSHA", nothing, 0)),
            ("GCRA hit_unless, one per round trip", one_at_a_time(*hit_unless)),
            ("GCRA hit_unless, 4 per write", pipelined(4, *hit_unless)),
            ("GCRA hit_unless, 8 per write", pipelined(8, *hit_unless)),
        ]
        one_at_a_time("GET", "bench:nothing")(2_000)  # warm up
        print(f"private redis-server at {url}, {n:,} commands per series\n")
        print(f"{'series':42s} {'wall':>8s} {'caller CPU':>11s} {'redis CPU':>10s} {'CPU total':>10s}   µs per command")
        for label, send in series:
            wall, caller, server = measure(send, n, pid)
            print(f"{label:42s} {wall:8.1f} {caller:11.1f} {server:10.1f} {caller + server:10.1f}")
        raw.close()
        conn.disconnect()
        client.close()

    budget = args.embedded_us / TARGET - args.embedded_us
    print(f"\nbudget at {TARGET}× of an embedded-limiter request costing {args.embedded_us:.0f} µs of server CPU: "
          f"{budget:.0f} µs for everything Redis adds per request (caller CPU + redis CPU above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
