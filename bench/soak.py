#!/usr/bin/env python3
"""A soak run: ``manage.py serve --workers 2`` on PostgreSQL + Redis for 5 minutes, under
steady traffic, key management, one Redis outage and one PostgreSQL connection cut.

Not in CI (it takes minutes and wants a quiet machine for its throughput). It needs
PostgreSQL at ``$KEYGATE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/test``;
the run works in a schema of its own, dropped at the end) and ``redis-server`` on the PATH: the
rate limits live in a private redis-server on a free port, and the database is reached
through a TCP proxy this script controls, so the machine's shared PostgreSQL and Redis are
never stopped.

What happens, on a timeline scaled to ``--minutes``:

* load threads (``--threads``, keep-alive) send ``GET /secret`` and ``GET /data`` with one of
  1,000 keys, and now and then mint a query token (``POST /tokens``) and use it;
* a manager creates, rotates and revokes keys through the admin API every 2 s; after each
  revocation a prober asks with the revoked key on fresh connections (so both workers answer)
  until both refuse it: the propagation time;
* at 35 % Redis is killed for 10 s and restarted; at 60 % every PostgreSQL connection is cut
  (the proxy closes them and refuses new ones for 2 s).

What it prints, and holds to:

* requests and responses by status; 5xx other than 503 inside an outage window (must be 0);
* each worker's RSS after 30 s of warm-up and at the end (growth ≤ 10 %);
* every key's ``use_count`` in the store after the server stopped against the accepted (2xx)
  responses the load generator saw for it (exactly equal);
* the worst revocation propagation (< 1 s);
* ``keygate_requests_total`` from ``/metrics`` (read after the load stops) against the
  responses the clients saw, per status (equal).

    python bench/soak.py                  # 5 minutes
    python bench/soak.py --minutes 1      # a smoke run
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from keys import issue_key, open_store  # noqa: E402

PG_URL = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEYS = 1000
REVOCATION_BOUND = 1.0
RSS_GROWTH_BOUND = 0.10
SAMPLE = re.compile(r'^keygate_requests_total\{([^}]*)\} (\S+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proxy:
    """127.0.0.1:<port> → PostgreSQL, until ``cut()`` closes every connection and refuses
    new ones (``restore()`` ends that)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
            with self.lock:
                self.conns = [c for c in self.conns if c not in (src, dst)]

    def cut(self) -> None:
        self.up = False
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        self.up = True


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            sys.exit("soak: redis-server is not installed (apt install redis-server)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("soak: the private redis-server did not start")
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def key_id_of(credential: str) -> str:
    """The key id behind a key (``kg_<id>…``) or a query token (``<id>.…``)."""
    return credential[3:15] if credential.startswith("kg_") else credential.split(".", 1)[0]


class Tally:
    """What the clients saw: responses by status, accepted responses per key, 5xx by time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.accepted: collections.Counter[str] = collections.Counter()
        self.server_errors: list[tuple[float, int, str]] = []
        self.client_errors = 0

    def record(self, resp: requests.Response | None, credential: str | None, what: str) -> None:
        with self.lock:
            if resp is None:
                self.client_errors += 1
                return
            self.statuses[resp.status_code] += 1
            if credential is not None and 200 <= resp.status_code < 300:
                self.accepted[key_id_of(credential)] += 1
            if resp.status_code >= 500:
                self.server_errors.append((time.monotonic(), resp.status_code, what))


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.duration = args.minutes * 60
        self.tally = Tally()
        self.pool: list[str] = []
        self.pool_lock = threading.Lock()
        self.stop = threading.Event()
        self.windows: list[tuple[float, float, str]] = []  # outage windows (monotonic)
        self.propagation: list[float] = []
        self.events: collections.Counter[str] = collections.Counter()

    # -- clients --------------------------------------------------------------------------

    def call(self, session: requests.Session, method: str, path: str, credential: str | None = None,
             header: bool = True, what: str = "", **kw: Any) -> requests.Response | None:
        headers = kw.pop("headers", {})
        if credential is not None and header:
            headers["API-Key"] = credential
        try:
            resp = session.request(method, self.url + path, headers=headers, timeout=15, **kw)
        except requests.RequestException:
            resp = None
        self.tally.record(resp, credential, what or path)
        return resp

    def load(self, seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as s:
            while not self.stop.is_set():
                with self.pool_lock:
                    key = rng.choice(self.pool)
                roll = rng.random()
                if roll < 0.02:
                    resp = self.call(s, "POST", "/tokens", key, json={"scopes": ["data:read"], "ttl": 300})
                    if resp is not None and resp.status_code == 201:
                        token = resp.json()["token"]
                        for _ in range(3):
                            self.call(s, "GET", f"/data?token={token}", token, header=False, what="/data?token")
                elif roll < 0.55:
                    self.call(s, "GET", "/secret", key)
                else:
                    self.call(s, "GET", "/data", key)

    def manage(self) -> None:
        rng = random.Random(7)
        tick = 0
        with requests.Session() as s:
            while not self.stop.wait(2.0):
                action = ("create", "rotate", "revoke")[tick % 3]
                tick += 1
                if action == "create":
                    resp = self.call(s, "POST", "/admin/keys", self.admin,
                                     json={"name": f"soak-new-{self.events['create']}",
                                           "scopes": ["secret:read", "data:read"]})
                    if resp is not None and resp.status_code == 201:
                        with self.pool_lock:
                            self.pool.append(resp.json()["key"])
                        self.events["create"] += 1
                    continue
                with self.pool_lock:
                    victim = self.pool.pop(rng.randrange(len(self.pool)))
                if action == "rotate":
                    resp = self.call(s, "POST", f"/admin/keys/{key_id_of(victim)}/rotate", self.admin)
                    if resp is not None and resp.status_code == 201:
                        with self.pool_lock:
                            self.pool.append(resp.json()["key"])
                        self.events["rotate"] += 1
                    else:
                        with self.pool_lock:
                            self.pool.append(victim)
                    continue
                resp = self.call(s, "DELETE", f"/admin/keys/{key_id_of(victim)}", self.admin)
                if resp is not None and resp.status_code == 204:
                    self.events["revoke"] += 1
                    self.propagation.append(self.probe_revoked(victim, time.monotonic()))
                else:
                    with self.pool_lock:
                        self.pool.append(victim)

    def probe_revoked(self, key: str, revoked_at: float) -> float:
        """Seconds from the revocation's answer to the last 2xx with the key, asking on fresh
        connections until 20 in a row refuse it (or 3 s pass)."""
        last_ok, refused = revoked_at, 0
        while refused < 20 and time.monotonic() - revoked_at < 3:
            with requests.Session() as fresh:
                resp = self.call(fresh, "GET", "/secret", key, headers={"Connection": "close"})
            if resp is not None and resp.status_code == 200:
                last_ok, refused = time.monotonic(), 0
            elif resp is not None and resp.status_code == 401:
                refused += 1
        return last_ok - revoked_at

    # -- the run ----------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.server.pid:
                    pids.append(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        return sorted(pids)

    @staticmethod
    def rss_mb(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run(self) -> int:
        schema = f"keygate_soak_{os.getpid()}_{secrets.token_hex(4)}"
        import psycopg

        admin_conn = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
        admin_conn.execute(f'CREATE SCHEMA "{schema}"')
        redis = PrivateRedis(self.workdir / "redis")
        (self.workdir / "redis").mkdir()
        redis.start()
        host_port = re.search(r"@([^/:]+):?(\d+)?/", PG_URL)
        target = (host_port.group(1), int(host_port.group(2) or 5432)) if host_port else ("127.0.0.1", 5432)
        proxy = Proxy(target)
        sep = "&" if "?" in PG_URL else "?"
        direct_url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
        proxied_url = direct_url.replace(f"{target[0]}:{target[1]}", f"127.0.0.1:{proxy.port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
        env.update(KEYGATE_DATABASE_URL=proxied_url, KEYGATE_RATELIMIT_STORAGE_URL=redis.url,
                   KEYGATE_RATELIMIT_PREFIX=f"soak{os.getpid()}:", KEYGATE_INSTANCE_PATH=str(self.workdir / "instance"),
                   KEYGATE_SECRET_KEY=secrets.token_urlsafe(48), KEYGATE_DEFAULT_RATE_LIMIT="1000000/minute",
                   KEYGATE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
        log_path = self.workdir / "server.log"
        try:
            store = open_store(direct_url)
            store.migrate()
            self.admin = issue_key(store, name="soak-admin", scopes=["admin"], actor="soak").plaintext
            self.pool = [issue_key(store, name=f"soak-{i}", scopes=["secret:read", "data:read"], actor="soak").plaintext
                         for i in range(KEYS)]
            store.close()
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(log_path, "w") as log:
                self.server = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port),
                                                "--workers", "2"], env=env, cwd=ROOT, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 30
            while True:
                with requests.Session() as probe:  # counted: the server counts these too
                    resp = self.call(probe, "GET", "/readyz")
                if resp is not None and resp.status_code == 200:
                    break
                if time.monotonic() > deadline or self.server.poll() is not None:
                    sys.exit(f"soak: the server did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            print(f"soak: {self.args.minutes:g} min, serve --workers 2 on PostgreSQL (schema {schema}, through a "
                  f"proxy) + a private redis-server, {KEYS} keys, {self.args.threads} load threads", flush=True)
            self.tally.client_errors = 0  # refused connections while the server started
            started = time.monotonic()
            threads = [threading.Thread(target=self.load, args=(i,), daemon=True) for i in range(self.args.threads)]
            threads.append(threading.Thread(target=self.manage, daemon=True))
            for t in threads:
                t.start()

            timeline = [(30, "rss"), (self.duration * 0.35, "redis-down"), (self.duration * 0.35 + 10, "redis-up"),
                        (self.duration * 0.60, "pg-cut"), (self.duration * 0.60 + 2, "pg-restore"),
                        (self.duration, "end")]
            rss_start: dict[int, float] = {}
            outage_start = 0.0
            for at, step in sorted(timeline):
                time.sleep(max(0.0, started + at - time.monotonic()))
                now = time.monotonic()
                if step == "rss":
                    rss_start = {pid: self.rss_mb(pid) for pid in self.worker_pids()}
                elif step == "redis-down":
                    outage_start = now
                    redis.kill()
                elif step == "redis-up":
                    redis.start()
                    self.windows.append((outage_start, time.monotonic() + 2, "Redis outage"))
                elif step == "pg-cut":
                    outage_start = now
                    proxy.cut()
                elif step == "pg-restore":
                    proxy.restore()
                    self.windows.append((outage_start, time.monotonic() + 3, "PostgreSQL cut"))
                print(f"  {now - started:6.1f} s  {step}", flush=True)
            self.stop.set()
            for t in threads:
                t.join(30)
            elapsed = time.monotonic() - started
            rss_end = {pid: self.rss_mb(pid) for pid in self.worker_pids()}

            time.sleep(2)  # each worker writes its request counts to the shared files every second
            with requests.Session() as s:  # what the clients saw, then what the server counted
                seen = dict(self.tally.statuses)
                scrape = self.call(s, "GET", "/metrics", self.admin)  # its own usage is counted too
                metrics = scrape.text if scrape is not None else ""
            counted: collections.Counter[int] = collections.Counter()
            for labels, value in SAMPLE.findall(metrics):
                counted[int(re.search(r'status="(\d+)"', labels).group(1))] += int(float(value))
            # the scrape itself is counted as the load generator's too (not by the server yet)

            self.server.send_signal(signal.SIGTERM)  # the workers write their usage counters as they exit
            self.server.wait(60)
            store = open_store(direct_url)
            use_counts = {}
            after = None
            while page := store.list_keys(limit=1000, after=after):
                use_counts.update({r.id: r.use_count for r in page})
                after = page[-1].id
            store.close()
            return self.report(elapsed, seen, counted, rss_start, rss_end, use_counts, log_path)
        finally:
            if getattr(self, "server", None) is not None and self.server.poll() is None:
                self.server.kill()
            redis.kill()
            proxy.cut()
            admin_conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            admin_conn.close()

    def report(self, elapsed: float, seen: dict[int, int], counted: collections.Counter[int],
               rss_start: dict[int, float], rss_end: dict[int, float], use_counts: dict[str, int],
               log_path: Path) -> int:
        ok = True
        total = sum(seen.values())
        print()
        print(f"requests: {total:,} in {elapsed:.0f} s ({total / elapsed:,.0f}/s; the machine is shared: "
              "throughput is indicative only), client-side failures (no response): "
              f"{self.tally.client_errors}")
        print("responses by status: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(seen.items())))
        print(f"key management: {dict(self.events)}")
        unexpected = [(t, code, what) for t, code, what in self.tally.server_errors
                      if code != 503 or not any(a <= t <= b for a, b, _ in self.windows)]
        in_windows = len(self.tally.server_errors) - len(unexpected)
        ok &= not unexpected
        print(f"5xx: {len(self.tally.server_errors):,}, of which 503 inside the outage windows {in_windows:,}; "
              f"any other 5xx: {len(unexpected)} (must be 0) {'PASS' if not unexpected else 'FAIL'}")
        for t, code, what in unexpected[:5]:
            print(f"    {code} {what}")

        print("RSS per worker (MB): " + "; ".join(
            f"pid {pid}: {rss_start.get(pid, float('nan')):.1f} after 30 s -> {rss_end[pid]:.1f} at the end "
            f"({(rss_end[pid] / rss_start[pid] - 1) * 100:+.1f} %)" if pid in rss_start else f"pid {pid}: new"
            for pid in sorted(rss_end)))
        growth_ok = set(rss_start) == set(rss_end) and all(
            rss_end[p] <= rss_start[p] * (1 + RSS_GROWTH_BOUND) for p in rss_end)
        ok &= growth_ok
        print(f"  growth ≤ {RSS_GROWTH_BOUND:.0%} (same workers throughout)  {'PASS' if growth_ok else 'FAIL'}")

        accepted = self.tally.accepted
        keys_seen = set(accepted) | {k for k, n in use_counts.items() if n}
        mismatched = {k: (accepted.get(k, 0), use_counts.get(k, 0)) for k in keys_seen
                      if accepted.get(k, 0) != use_counts.get(k, 0)}
        ok &= not mismatched
        print(f"usage: {sum(use_counts.values()):,} counted in the store over {len(keys_seen):,} keys, "
              f"{sum(accepted.values()):,} accepted responses seen; keys that differ: {len(mismatched)} "
              f"{'PASS' if not mismatched else 'FAIL'}")
        for k, (a, u) in list(mismatched.items())[:5]:
            print(f"    {k}: seen {a}, stored {u}")

        worst = max(self.propagation, default=float("nan"))
        prop_ok = bool(self.propagation) and worst < REVOCATION_BOUND
        ok &= prop_ok
        print(f"revocation propagation: {len(self.propagation)} revocations, worst {worst * 1000:.0f} ms, "
              f"median {sorted(self.propagation)[len(self.propagation) // 2] * 1000 if self.propagation else 0:.0f} ms"
              f"  < {REVOCATION_BOUND:g} s  {'PASS' if prop_ok else 'FAIL'}")

        equal = dict(counted) == seen
        ok &= equal
        print(f"/metrics keygate_requests_total: {sum(counted.values()):,}, the clients saw {total:,}; "
              f"by status equal: {equal}  {'PASS' if equal else 'FAIL'}")
        if not equal:
            print(f"    metrics {dict(sorted(counted.items()))}\n    clients {dict(sorted(seen.items()))}")

        lines = log_path.read_text().splitlines()
        not_json = 0
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                not_json += 1
        outage_lines = [json.loads(x)["event"] for x in lines if '"keygate.backends"' in x]
        print(f"server log: {len(lines):,} lines, {not_json} not JSON; outage lines: {len(outage_lines)}")
        for event in outage_lines:
            print(f"    {event[:150]}")
        print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}")
        return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=6, help="load threads (default 6)")
    args = parser.parse_args()
    if args.minutes < 1:
        parser.error("--minutes: at least 1 (the timeline needs 30 s of warm-up and two outages)")
    workdir = Path(tempfile.mkdtemp(prefix="keygate-soak-"))
    try:
        return Soak(args, workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
