#!/usr/bin/env python3
"""keygate's server over real sockets, against its peers: wrk on loopback, ratios from one run.

Servers, all started by this script, each with 2 worker processes:

* ``keygate``: ``manage.py serve --workers 2`` (access log on, SQLite store, a key whose
  limit is never reached);
* ``httpauth@gunicorn``: the Flask-HTTPAuth app of ``bench/peers.py`` under
  ``gunicorn -w 2`` with gunicorn's defaults (no access log);
* ``httpauth@keygate`` and ``restx@keygate``: that app, and a bare Flask-RESTX route, under
  keygate's own server (``api.server.serve``, same worker settings, access log on);
* ``keygate-1M``: ``serve`` over a store of 1,000,000 keys (built by ``bench_auth.py``'s
  fixture and copied), wrk rotating over its 10,000 real keys or hitting one.

Three rounds, the servers alternating within each: 2 s of warm-up, then
``wrk -t1 -d5s``. Every target applies to the median of the three rounds' ratios; min and
max are printed beside it, and the servers' CPU time per request beside req/s.

    python bench/bench_http.py            # ~6 minutes; needs wrk (apt install wrk)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
WORKERS = 2
WARMUP_S, RUN_S, ROUNDS = 2, 5, 3
HUGE_LIMIT = "100000000/minute"
IDLE_CONNECTIONS, SLOW_CONNECTIONS = 200, 50
LOG_FORMAT = "text"  # --log-format: KEYGATE_LOG_FORMAT of every server keygate's own code runs


# -- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The server's process and its children (the workers)."""
        found = [self.proc.pid]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found.append(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
            except (OSError, IndexError, ValueError):
                continue
        return total / ticks

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def start(name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Server(name, proc, port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(server.url + "/healthz", timeout=1).status_code == 200:
                time.sleep(0.5)  # the other worker
                return server
        except requests.RequestException:
            time.sleep(0.1)
    server.stop()
    sys.exit(f"{name} did not start:\n{log.read_text()[-3000:]}")


def keygate_env(instance: Path, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(KEYGATE_INSTANCE_PATH=str(instance), KEYGATE_DATABASE_URL=database_url,
               KEYGATE_DEFAULT_RATE_LIMIT=HUGE_LIMIT, KEYGATE_LOG_FORMAT=LOG_FORMAT, PYTHONPATH=str(ROOT))
    return env


def cli(env: dict[str, str], *args: str, root: Path = ROOT) -> str:
    """``manage.py`` of ``root`` (this checkout, or another tree: bench_ab_server.py)."""
    out = subprocess.run([PY, str(root / "manage.py"), *args], env=env, cwd=root,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"manage.py {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def serve_keygate(name: str, env: dict[str, str], workdir: Path, root: Path = ROOT) -> Server:
    port = free_port()
    return start(name, [PY, str(root / "manage.py"), "serve", "--port", str(port),
                        "--workers", str(WORKERS)], env, port, workdir)


def serve_on_keygates_server(name: str, target: str, env: dict[str, str], workdir: Path) -> Server:
    port = free_port()
    code = ("import sys; sys.path.insert(0, 'bench'); from api.server import ServeOptions, serve; "
            f"serve(ServeOptions(port={port}, workers={WORKERS}, log_format={LOG_FORMAT!r}), target={target!r})")
    return start(name, [PY, "-c", code], env, port, workdir)


def serve_on_gunicorn(name: str, target: str, env: dict[str, str], workdir: Path) -> Server:
    port = free_port()
    return start(name, [PY, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}",
                        "--chdir", str(BENCH), target], env, port, workdir)


# -- load -----------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p99_ms: float
    requests: int
    bad: int  # non-2xx responses plus socket errors
    cpu_us: float  # the server's CPU time per request

    def show(self) -> str:
        return f"{self.rps:8.0f} req/s  p99 {self.p99_ms:6.2f} ms  cpu {self.cpu_us:5.0f} µs/req"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(server: Server, path: str, conns: int, seconds: int, *, headers: dict[str, str] | None = None,
        script: Path | None = None) -> Run:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    cpu0 = server.cpu_seconds()
    out = subprocess.run([*argv, server.url + path], capture_output=True, text=True, check=True).stdout
    cpu = server.cpu_seconds() - cpu0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)
    return Run(rps, float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"), total, bad,
               cpu * 1e6 / max(total, 1))


def measure(server: Server, path: str, conns: int, **kw: object) -> Run:
    wrk(server, path, conns, WARMUP_S, **kw)  # type: ignore[arg-type]
    return wrk(server, path, conns, RUN_S, **kw)  # type: ignore[arg-type]


def rotating_script(workdir: Path, name: str, keys: list[str]) -> Path:
    """A wrk script sending ``keys`` round-robin in ``API-Key`` (one key: the same cost per
    request in wrk, so two scripts compare only the server)."""
    keyfile = workdir / f"{name}.keys"
    keyfile.write_text("\n".join(keys) + "\n")
    script = workdir / f"{name}.lua"
    script.write_text(f"""
local keys = {{}}
for line in io.lines("{keyfile}") do keys[#keys + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/secret", {{["API-Key"] = keys[(i % #keys) + 1]}})
end
""")
    return script


@contextmanager
def hostile_clients(server: Server) -> Iterator[None]:
    """``IDLE_CONNECTIONS`` sockets that send nothing and ``SLOW_CONNECTIONS`` that send one
    header byte every 2 s, each reopened when the server closes it."""
    stop = threading.Event()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64 + b"\r\n\r\n"

    def hold(slow: bool) -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                    s.settimeout(2)
                    for i in range(len(request)):
                        if slow:
                            s.send(request[i:i + 1])
                        try:
                            if not s.recv(1024):
                                break  # closed by the server (its header timeout): open another
                        except TimeoutError:
                            pass  # two seconds of nothing, as intended
                        if stop.is_set():
                            return
            except OSError:
                stop.wait(0.2)

    threads = [threading.Thread(target=hold, args=(i < SLOW_CONNECTIONS,), daemon=True)
               for i in range(IDLE_CONNECTIONS + SLOW_CONNECTIONS)]
    for t in threads:
        t.start()
    time.sleep(1)
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def healthz_seconds(server: Server) -> float:
    started = time.perf_counter()
    requests.get(server.url + "/healthz", timeout=10, headers={"Connection": "close"})
    return time.perf_counter() - started


# -- the run --------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    target: str
    check: Callable[[float], bool]
    ratios: list[float] = field(default_factory=list)

    def verdict(self) -> tuple[float, str]:
        median = statistics.median(self.ratios)
        return median, "PASS" if self.check(median) else "FAIL"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="KEYGATE_LOG_FORMAT of the servers on keygate's code (default text)")
    args = parser.parse_args(argv)
    global LOG_FORMAT
    LOG_FORMAT = args.log_format
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt install wrk)")
    sys.path.insert(0, str(BENCH))
    from bench_auth import DISTINCT_KEYS, sqlite_fixture

    print(f"cpu: {_cpu()}; {os.cpu_count()} cores; {WORKERS} workers per server; "
          f"wrk -t1, {WARMUP_S} s warm-up + {RUN_S} s per measurement, {args.rounds} rounds; logs: {LOG_FORMAT}")
    big = sqlite_fixture(1_000_000)
    with tempfile.TemporaryDirectory(prefix="kg-bench-http-") as tmp, ExitStack() as servers:
        work = Path(tmp)
        # The small store: init, one key whose limit is never reached, a token for /data.
        env = keygate_env(work / "small", f"sqlite:///{work / 'small' / 'keygate.db'}")
        cli(env, "init", "--no-admin-key")
        made = json.loads(cli(env, "create-key", "--name", "bench", "--scope", "secret:read",
                              "--scope", "data:read", "--rate-limit", HUGE_LIMIT, "--json"))
        key = made["key"]
        token = json.loads(cli(env, "mint-token", made["id"], "--scope", "data:read", "--ttl", "2h",
                               "--json"))["token"]
        peer_env = {**env, "BENCH_PEER_KEY": key}
        # The big store, copied: the server writes usage counts into it.
        shutil.copy(Path(big.database_url.removeprefix("sqlite:///")), work / "big.db")
        big_env = keygate_env(work / "big", f"sqlite:///{work / 'big.db'}")
        cli(big_env, "init", "--no-admin-key")
        one_key = rotating_script(work, "one", big.keys[:1])
        many_keys = rotating_script(work, "many", big.keys[:DISTINCT_KEYS])

        print("starting servers ...", flush=True)
        kg = servers.enter_context(_stopping(serve_keygate("keygate", env, work)))
        gun = servers.enter_context(_stopping(serve_on_gunicorn("httpauth@gunicorn", "peers:httpauth_app()",
                                                                peer_env, work)))
        hak = servers.enter_context(_stopping(serve_on_keygates_server(
            "httpauth@keygate", "peers:httpauth_app", peer_env, work)))
        rxk = servers.enter_context(_stopping(serve_on_keygates_server(
            "restx@keygate", "peers:restx_app", peer_env, work)))
        big_kg = servers.enter_context(_stopping(serve_keygate("keygate-1M", big_env, work)))
        auth = {"API-Key": key}

        rows = [
            Row("keygate serve / Flask-HTTPAuth@gunicorn, -c8", ">= 1.5x", lambda r: r >= 1.5),
            Row("keygate serve / Flask-HTTPAuth@gunicorn, -c64", ">= 1.5x", lambda r: r >= 1.5),
            Row("keygate app / Flask-HTTPAuth app, both on keygate's server, -c8", ">= 0.85x", lambda r: r >= 0.85),
            Row("keygate app / bare Flask-RESTX route, both on keygate's server, -c8", ">= 0.9x", lambda r: r >= 0.9),
            Row("p99 at -c64: keygate serve / Flask-HTTPAuth@gunicorn", "<= 1.0x", lambda r: r <= 1.0),
            Row("1,000,000 keys: 10,000 distinct keys / one key, -c8", ">= 0.9x", lambda r: r >= 0.9),
            Row(f"{IDLE_CONNECTIONS} idle + {SLOW_CONNECTIONS} slow-header clients: with / without, -c8",
                ">= 0.8x", lambda r: r >= 0.8),
            Row("/data?token= / /secret with a header key, -c8", ">= 0.9x", lambda r: r >= 0.9),
        ]
        healthz_worst = 0.0
        bad_total = 0
        for n in range(1, args.rounds + 1):
            print(f"\n-- round {n}")
            runs: dict[str, Run] = {}

            def run(label: str, server: Server, path: str, conns: int, **kw: object) -> Run:
                result = runs[label] = measure(server, path, conns, **kw)
                print(f"  {label:<34} {result.show()}" + (f"  ({result.bad} bad!)" if result.bad else ""),
                      flush=True)
                return result

            run("keygate -c8", kg, "/secret", 8, headers=auth)
            run("httpauth@gunicorn -c8", gun, "/secret", 8, headers=auth)
            run("httpauth@keygate -c8", hak, "/secret", 8, headers=auth)
            run("restx@keygate -c8", rxk, "/secret", 8)
            run("keygate -c64", kg, "/secret", 64, headers=auth)
            run("httpauth@gunicorn -c64", gun, "/secret", 64, headers=auth)
            run("keygate-1M one key -c8", big_kg, "/secret", 8, script=one_key)
            run("keygate-1M 10k keys -c8", big_kg, "/secret", 8, script=many_keys)
            run("keygate /data?token= -c8", kg, f"/data?token={token}", 8)
            run("keygate -c8 (again)", kg, "/secret", 8, headers=auth)
            with hostile_clients(kg):
                result = measure(kg, "/secret", 8, headers=auth)
                healthz = healthz_seconds(kg)
            runs["keygate -c8 + hostile"] = result
            healthz_worst = max(healthz_worst, healthz)
            print(f"  {'keygate -c8, idle+slow clients':<34} {result.show()}  /healthz {healthz * 1000:.0f} ms")
            bad_total += sum(r.bad for r in runs.values())

            own = (runs["keygate -c8"].rps + runs["keygate -c8 (again)"].rps) / 2
            rows[0].ratios.append(runs["keygate -c8"].rps / runs["httpauth@gunicorn -c8"].rps)
            rows[1].ratios.append(runs["keygate -c64"].rps / runs["httpauth@gunicorn -c64"].rps)
            rows[2].ratios.append(runs["keygate -c8"].rps / runs["httpauth@keygate -c8"].rps)
            rows[3].ratios.append(runs["keygate -c8"].rps / runs["restx@keygate -c8"].rps)
            rows[4].ratios.append(runs["keygate -c64"].p99_ms / runs["httpauth@gunicorn -c64"].p99_ms)
            rows[5].ratios.append(runs["keygate-1M 10k keys -c8"].rps / runs["keygate-1M one key -c8"].rps)
            rows[6].ratios.append(runs["keygate -c8 + hostile"].rps / own)
            rows[7].ratios.append(runs["keygate /data?token= -c8"].rps / runs["keygate -c8 (again)"].rps)

    print(f"\n{'row':<78} {'median':>7} {'min':>6} {'max':>6}  target")
    ok = True
    for row in rows:
        median, verdict = row.verdict()
        ok &= verdict == "PASS"
        print(f"{row.name:<78} {median:6.2f}x {min(row.ratios):5.2f}x {max(row.ratios):5.2f}x  "
              f"{row.target:<8} {verdict}")
    print(f"/healthz with {IDLE_CONNECTIONS} idle + {SLOW_CONNECTIONS} slow clients: worst "
          f"{healthz_worst * 1000:.0f} ms (target < 1000 ms) {'PASS' if healthz_worst < 1 else 'FAIL'}")
    print(f"non-2xx responses and socket errors over the whole run: {bad_total}")
    ok &= healthz_worst < 1 and bad_total == 0
    return 0 if ok else 1


@contextmanager
def _stopping(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
