#!/usr/bin/env python3
"""What the shared Redis limiter costs next to the embedded one (issue 17), in one run.

(a) In process: one ``hit`` of the embedded limiter (GCRA in a shared ``mmap``) and of
    the Redis limiter (one ``EVALSHA``), µs per hit and their ratio.
(b) Over HTTP: ``wrk -t1 -c8`` on ``GET /secret`` (a key whose limit is never reached)
    against real ``manage.py serve --workers 2`` servers, one per setup, in alternating
    rounds; each setup's req/s divided by SQLite + embedded's of the same round, median
    over the rounds. Targets: SQLite + Redis and PostgreSQL + Redis ≥ 0.85×.
    Beside req/s, the CPU time per request of the servers' processes and of redis-server,
    which a busy shared machine disturbs far less than req/s.
(c) Redis commands per authenticated request, as ``MONITOR`` sees them: exactly 1.

Everything runs against a private ``redis-server`` (a free port, no persistence) that
the script starts and stops; PostgreSQL (``$KEYGATE_TEST_POSTGRES_URL`` or
127.0.0.1:5432/test) gets a schema of its own, dropped at the end. Servers are
started through ``manage.py serve --port --workers`` and waited for on ``/healthz``,
whatever server ``serve`` runs.

    python bench/bench_limits.py [--rounds 5] [--duration 5] [--no-postgres] [--quick]
                                 [--also-ref main]   # + SQLite + Redis as git REF serves it

Exit status 1 when a target is missed (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keys.parse import RateLimit  # noqa: E402
from keys.ratelimit import SharedMemoryLimiter  # noqa: E402
from keys.ratelimit_redis import RedisLimiter  # noqa: E402

PG_URL = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
NEVER_REACHED = "100000000/minute"
TARGET_RATIO = 0.85


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a private Redis ---------------------------------------------------------------------


@contextmanager
def private_redis(workdir: Path) -> Iterator[tuple[str, int]]:
    """``redis-server`` on a free port of its own; yields its URL and process id."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def commands_during(url: str, action: Callable[[], object]) -> Counter[str]:
    """The commands clients sent while ``action()`` ran, by name (those a script runs
    inside Redis excluded), as ``MONITOR`` reports them."""
    marker = f"bench-end-{uuid.uuid4().hex}"
    watcher, other = redis.Redis.from_url(url), redis.Redis.from_url(url)
    other.ping()  # connected before watching starts
    seen: Counter[str] = Counter()
    with watcher.monitor() as monitor:
        action()
        other.echo(marker)
        while True:
            command = monitor.next_command()
            if marker in command["command"]:
                break
            if command["client_type"] != "lua":
                seen[command["command"].split()[0].upper()] += 1
    watcher.close()
    other.close()
    return seen


def cpu_seconds(*roots: int) -> float:
    """CPU time (user + system) of these processes and their children so far."""
    pids = set(roots)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) in roots:
                pids.add(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


# -- (a) in process ------------------------------------------------------------------------


def per_hit_us(hit: Callable[[], object], batch: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(batch):
        hit()
    return (clock() - start) / batch * 1e6


def in_process(redis_url: str, workdir: Path, rounds: int, batch: int) -> dict[str, float]:
    limit = RateLimit(100_000_000, "minute")
    embedded = SharedMemoryLimiter(workdir / "ratelimits.mmap")
    shared = RedisLimiter(redis_url, prefix=f"bench:{os.getpid()}:")
    hits = {"embedded": lambda: embedded.hit("benchkey0001", limit),
            "redis": lambda: shared.hit("benchkey0001", limit)}
    for hit in hits.values():  # warm: the memo, the connection, the script
        per_hit_us(hit, 200, time.perf_counter)
    wall: dict[str, list[float]] = {name: [] for name in hits}
    cpu: dict[str, list[float]] = {name: [] for name in hits}
    for _ in range(rounds):
        for name, hit in hits.items():
            wall[name].append(per_hit_us(hit, batch, time.perf_counter))
            cpu[name].append(per_hit_us(hit, batch, time.process_time))
    embedded.close()
    shared.close()
    return {f"{name} {kind}": statistics.median(series[name])
            for kind, series in (("wall", wall), ("cpu", cpu)) for name in hits}


# -- (b) servers and wrk -------------------------------------------------------------------


@dataclass
class Setup:
    label: str
    store: str  # "sqlite" or "postgresql"
    limiter: str  # "embedded" or "redis"
    target: bool = False  # held to TARGET_RATIO
    root: Path = ROOT  # the source tree whose manage.py serves it
    url: str = ""
    key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    rps: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)  # µs per request, the server's processes
    redis_cpu: list[float] = field(default_factory=list)  # µs per request, redis-server's


def manage(root: Path, env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, str(root / "manage.py"), *args], env=env, cwd=root,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"manage.py {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A store URL in a PostgreSQL schema of this run's own, dropped on the way out."""
    import sqlalchemy as sa

    schema = f"keygate_bench_limits_{os.getpid()}_{secrets.token_hex(4)}"
    engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        sep = "&" if "?" in PG_URL else "?"
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


def start_server(setup: Setup, store_url: str, redis_url: str, workdir: Path, workers: int) -> None:
    """Initialise the setup's store, create its key, start ``serve`` and wait for /healthz."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(KEYGATE_INSTANCE_PATH=str(workdir / "instance"), KEYGATE_DATABASE_URL=store_url,
               KEYGATE_SECRET_KEY=secrets.token_urlsafe(48))
    if setup.limiter == "redis":
        env.update(KEYGATE_RATELIMIT_STORAGE_URL=redis_url, KEYGATE_RATELIMIT_PREFIX=f"bench:{setup.store}:")
    manage(setup.root, env, "init", "--no-admin-key")
    created = json.loads(manage(setup.root, env, "create-key", "--name", "bench", "--scope", "secret:read",
                                "--rate-limit", NEVER_REACHED, "--json"))
    setup.key = created["key"]
    port = free_port()
    setup.url = f"http://127.0.0.1:{port}"
    log = (workdir / "server.log").open("w")
    setup.proc = subprocess.Popen(
        [sys.executable, str(setup.root / "manage.py"), "serve", "--port", str(port), "--workers", str(workers)],
        env=env, cwd=setup.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if setup.proc.poll() is not None:
            raise SystemExit(f"{setup.label}: server exited; see {workdir / 'server.log'}")
        try:
            if requests.get(setup.url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"{setup.label}: server did not answer /healthz; see {workdir / 'server.log'}")
    resp = requests.get(setup.url + "/secret", headers={"API-Key": setup.key}, timeout=5)
    if resp.status_code != 200 or "RateLimit" not in resp.headers:
        raise SystemExit(f"{setup.label}: GET /secret answered {resp.status_code}, not a limited 200")


def stop_server(setup: Setup) -> None:
    if setup.proc is not None and setup.proc.poll() is None:
        setup.proc.terminate()
        try:
            setup.proc.wait(20)
        except subprocess.TimeoutExpired:
            setup.proc.kill()
            setup.proc.wait(5)


_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")
_TOTAL = re.compile(r"(\d+) requests in")


def wrk(setup: Setup, seconds: float, redis_pid: int = 0) -> float:
    """req/s of ``wrk -t1 -c8`` on ``GET /secret`` with the setup's key; every answer a 200.
    Records the CPU time per request of the server's processes and of redis-server."""
    assert setup.proc is not None
    server0, redis0 = cpu_seconds(setup.proc.pid), cpu_seconds(redis_pid) if redis_pid else 0.0
    result = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds:g}s", "-H", f"API-Key: {setup.key}", setup.url + "/secret"],
        capture_output=True, text=True, timeout=seconds + 60)
    out = result.stdout
    m, total = _RPS.search(out), _TOTAL.search(out)
    if total and redis_pid:
        n = int(total.group(1))
        setup.server_cpu.append((cpu_seconds(setup.proc.pid) - server0) * 1e6 / n)
        setup.redis_cpu.append((cpu_seconds(redis_pid) - redis0) * 1e6 / n)
    if result.returncode != 0 or m is None:
        raise SystemExit(f"{setup.label}: wrk failed: {result.stderr.strip() or out}")
    if "Non-2xx" in out or "Socket errors" in out:
        bad = "; ".join(line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line)
        raise SystemExit(f"{setup.label}: not every request was a 200 ({bad})")
    return float(m.group(1))


def one_command_each(setup: Setup, redis_url: str, requests_n: int) -> Counter[str]:
    """Redis commands seen while ``requests_n`` authenticated requests are answered, each
    on a connection of its own (so every worker answers some)."""
    headers = {"API-Key": setup.key, "Connection": "close"}

    def send() -> None:
        for _ in range(requests_n):
            if requests.get(setup.url + "/secret", headers=headers, timeout=5).status_code != 200:
                raise SystemExit(f"{setup.label}: a request was refused while counting")

    send()  # every worker connected and has the script, so the count is the steady state
    return commands_during(redis_url, send)


# -- the run -------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def export_ref(ref: str, into: Path) -> Path:
    """The tree of git ``ref`` (``main``, a commit), exported to ``into`` to serve from."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--also-ref {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _postgres_reachable() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="wrk rounds per setup (default 5)")
    ap.add_argument("--duration", type=float, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="serve --workers (default 2)")
    ap.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL setups")
    ap.add_argument("--also-ref", metavar="REF",
                    help="also SQLite + Redis as served by git REF (e.g. main), for a before/after in the same "
                         "run; its dependencies must be installed in this environment")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 s: a smoke test, numbers only indicative")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 2, 2
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    postgres = not args.no_postgres and _postgres_reachable()
    started = time.monotonic()
    print(f"keygate limiter benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    if os.getloadavg()[0] > 0.8:
        print("warning: other processes compete for the CPU; expect noisy numbers (ratios are same-round)")

    ok = True
    with tempfile.TemporaryDirectory(prefix="kg-bench-limits-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        redis_url, redis_pid = stack.enter_context(private_redis(workdir))
        info = redis.Redis.from_url(redis_url).info("server")
        print(f"private redis-server {info['redis_version']} at {redis_url}")

        print(f"\n(a) one limiter hit, in process (median of {10 if args.quick else 30} batches of 2,000 hits)")
        a = in_process(redis_url, workdir, rounds=10 if args.quick else 30, batch=2000)
        print(f"    embedded (shared-memory GCRA)  {a['embedded wall']:7.1f} µs   "
              f"(CPU {a['embedded cpu']:.1f} µs)")
        print(f"    Redis (one EVALSHA)            {a['redis wall']:7.1f} µs   "
              f"(CPU in the caller {a['redis cpu']:.1f} µs)   "
              f"{a['redis wall'] / a['embedded wall']:.1f}× wall, {a['redis cpu'] / a['embedded cpu']:.1f}× CPU")

        setups = [Setup("SQLite + embedded", "sqlite", "embedded"),
                  Setup("SQLite + Redis", "sqlite", "redis", target=True)]
        if postgres:
            setups += [Setup("PostgreSQL + embedded", "postgresql", "embedded"),
                       Setup("PostgreSQL + Redis", "postgresql", "redis", target=True)]
            pg_url = stack.enter_context(postgres_schema())
        if args.also_ref:
            setups.append(Setup(f"SQLite + Redis ({args.also_ref[:12]})", "sqlite", "redis",
                                root=export_ref(args.also_ref, workdir / "ref")))
        for i, setup in enumerate(setups):
            (workdir / f"s{i}").mkdir()
            # The two PostgreSQL setups share the run's schema, each with a key of its own.
            store_url = f"sqlite:///{workdir / f's{i}' / 'keygate.db'}" if setup.store == "sqlite" else pg_url
            stack.callback(stop_server, setup)
            start_server(setup, store_url, redis_url, workdir / f"s{i}", args.workers)
        baseline = setups[0]

        print(f"\n(b) HTTP: GET /secret, wrk -t1 -c8, {args.duration:g} s per run, {args.rounds} rounds, "
              f"manage.py serve --workers {args.workers}")
        for setup in setups:  # warm: every worker up, caches filled, connections open
            wrk(setup, min(2.0, args.duration))
        for r in range(args.rounds):
            order = setups[r % len(setups):] + setups[:r % len(setups)]  # each goes first in turn
            for setup in order:
                setup.rps.append(wrk(setup, args.duration, redis_pid))
            for setup in setups:
                setup.ratios.append(setup.rps[-1] / baseline.rps[-1])
            print(f"    round {r + 1}: " + ", ".join(f"{s.label} {s.rps[-1]:,.0f}" for s in setups), flush=True)
        print(f"\n    {'setup':24}{'req/s':>8}{'÷ SQLite + embedded':>22}   {'target':15}"
              f"{'CPU µs/request: server':>24}{'Redis':>7}{'CPU ratio':>11}")
        base_cpu = statistics.median(baseline.server_cpu)
        for setup in setups:
            ratio = statistics.median(setup.ratios)
            verdict = ""
            if setup.target:
                verdict = f"≥ {TARGET_RATIO}×  {_verdict(ratio >= TARGET_RATIO)}"
                ok &= ratio >= TARGET_RATIO
            spread = f"({min(setup.ratios):.2f}–{max(setup.ratios):.2f})" if setup is not baseline else ""
            server_cpu, redis_cpu = statistics.median(setup.server_cpu), statistics.median(setup.redis_cpu)
            if setup.limiter == "embedded":
                redis_cpu = 0.0  # nothing of its own there: what little shows is others' traffic
            print(f"    {setup.label:24}{statistics.median(setup.rps):>8,.0f}{ratio:>9.2f}× {spread:>11}   "
                  f"{verdict:15}{server_cpu:>24,.0f}{redis_cpu:>7,.0f}{base_cpu / (server_cpu + redis_cpu):>10.2f}×")
        print("    ÷ SQLite + embedded: median over the rounds of req/s ÷ SQLite + embedded's req/s in the\n"
              "    same round (min–max). CPU µs/request: medians, the server's processes and redis-server.\n"
              "    CPU ratio: SQLite + embedded's server CPU ÷ this setup's server + Redis CPU, per request;\n"
              "    unlike req/s, it hardly moves with what else the machine runs (wrk's CPU not counted)")

        print("\n(c) Redis commands per authenticated request (MONITOR, 200 requests, fresh connections)")
        for setup in (s for s in setups if s.limiter == "redis" and s.root == ROOT):
            seen = one_command_each(setup, redis_url, 200)
            per_request = sum(seen.values()) / 200
            exact = per_request == 1 and set(seen) == {"EVALSHA"}
            ok &= exact
            detail = ", ".join(f"{name} ×{n}" for name, n in seen.most_common())
            print(f"    {setup.label:24}{per_request:g}   ({detail})   target exactly 1  {_verdict(exact)}")

    print(f"\n{'all targets met' if ok else 'a target was missed'} ({time.monotonic() - started:.0f} s, "
          f"load average now {os.getloadavg()[0]:.1f})")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
