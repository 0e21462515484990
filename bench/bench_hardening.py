#!/usr/bin/env python
"""Two measurements behind issue 12's hardening (recorded in bench/README.md).

``probe``: what an unknown key id costs next to a real id with a wrong secret, on PostgreSQL.
Anyone can forge checksum-valid keys with random ids; before the negative cache each
unknown id was a round trip to the database while a known one came from memory, so the
difference told an attacker which ids exist, and cost the store a transaction per guess.
Requests alternate between a few repeated unknown ids and a real id with wrong secrets,
in a shuffled order (``--requests`` of each, at least 2,000), and each is timed alone:

* in-process (``app.wsgi_app``), with the negative cache and without it (``max_unknown=0``,
  what keygate did before), the baseline of the same run;
* over HTTP, against ``manage.py serve --workers 1`` on keep-alive connections.

Target: medians within 5 % of each other with the negative cache.

``audit``: how much the audit trail grows per 10,000 token mints (``POST /tokens``, in
process, SQLite), summarised per key and hour as keygate does now, against one row per mint
(the store's default ``summarize``), the baseline of the same run.

    python bench/bench_hardening.py                 # both
    python bench/bench_hardening.py probe --requests 5000
    python bench/bench_hardening.py audit --mints 10000
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import random
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from api.app import create_app  # noqa: E402
from keys import issue_key, open_store  # noqa: E402
from keys.cache import CachedLookup  # noqa: E402
from keys.keyformat import generate_key  # noqa: E402
from keys.store.base import KeyStore  # noqa: E402

PG_URL = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TARGET_DIFFERENCE = 0.05
UNKNOWN_IDS = 8  # "repeated unknown ids": a handful, each sent many times
HUGE_LIMIT = "100000000/minute"


# -- shared -----------------------------------------------------------------------------------


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A database URL on a schema of its own, dropped afterwards."""
    schema = f"keygate_bench_probe_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        engine.dispose()


def medians(label: str, samples: dict[str, list[float]]) -> float:
    unknown, wrong = statistics.median(samples["unknown"]), statistics.median(samples["wrong"])
    difference = (unknown - wrong) / wrong
    n = min(len(v) for v in samples.values())
    print(f"  {label:<44} unknown id {unknown:8.1f} µs   wrong secret {wrong:8.1f} µs   "
          f"difference {difference:+7.1%}   ({n:,} each)")
    return difference


def interleaved(requests: int) -> list[str]:
    order = ["unknown", "wrong"] * requests
    random.shuffle(order)
    return order


# -- probe: in process --------------------------------------------------------------------------


def time_in_process(app: Any, credentials: dict[str, Callable[[], str]], order: list[str]) -> dict[str, list[float]]:
    template = EnvironBuilder(path="/secret", method="GET").get_environ()
    samples: dict[str, list[float]] = {kind: [] for kind in credentials}

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        assert status.startswith("401"), status

    for kind in order:
        environ = dict(template)
        environ["HTTP_API_KEY"] = credentials[kind]()
        started = time.perf_counter_ns()
        body = app.wsgi_app(environ, start_response)
        b"".join(body)
        samples[kind].append((time.perf_counter_ns() - started) / 1000)
    return samples


def probe_credentials(real_id: str, requests: int) -> dict[str, Callable[[], str]]:
    """Both kinds made before the clock starts: a few unknown ids sent over and over, and a
    fresh wrong secret for the real id every time."""
    unknown = [generate_key().plaintext for _ in range(UNKNOWN_IDS)]
    wrong = iter([generate_key(real_id).plaintext for _ in range(requests + 1000)])
    return {"unknown": lambda: random.choice(unknown), "wrong": lambda: next(wrong)}


def probe_in_process(url: str, real_id: str, requests: int, instance: Path) -> dict[str, float]:
    results = {}
    for label, max_unknown in (("in-process, negative cache (keygate now)", 10_000),
                               ("in-process, without it (keygate before)", 0)):
        app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(instance / label[:20]),
                          "DEFAULT_RATE_LIMIT": HUGE_LIMIT})
        auth = app.extensions["keygate"]
        auth.lookup = CachedLookup(auth.store, max_entries=100_000, max_unknown=max_unknown)
        credentials = probe_credentials(real_id, requests)
        time_in_process(app, credentials, interleaved(200))  # warm-up: connections, caches
        results[label] = medians(label, time_in_process(app, credentials, interleaved(requests)))
        app.extensions["keygate.close"]()
    return results


# -- probe: over HTTP ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def keygate_server(url: str, instance: Path) -> Iterator[int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(KEYGATE_DATABASE_URL=url, KEYGATE_INSTANCE_PATH=str(instance), KEYGATE_SECRET_KEY=secrets.token_hex(32),
               KEYGATE_DEFAULT_RATE_LIMIT=HUGE_LIMIT,
               # refused credentials per address are to be limited (issue 12, item 4): not here
               KEYGATE_AUTH_FAILURE_LIMIT="100000000/minute")
    log = (instance / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port), "--workers", "1"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {(instance / 'server.log').read_text()}") from None
                time.sleep(0.1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def probe_over_http(url: str, real_id: str, requests: int, instance: Path) -> float:
    instance.mkdir(parents=True, exist_ok=True)
    with keygate_server(url, instance) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        credentials = probe_credentials(real_id, requests)
        samples: dict[str, list[float]] = {"unknown": [], "wrong": []}
        for i, kind in enumerate(interleaved(200) + interleaved(requests)):
            headers = {"API-Key": credentials[kind]()}
            started = time.perf_counter_ns()
            conn.request("GET", "/secret", headers=headers)
            resp = conn.getresponse()
            resp.read()
            elapsed = (time.perf_counter_ns() - started) / 1000
            assert resp.status == 401, resp.status
            if i >= 400:  # after the warm-up
                samples[kind].append(elapsed)
        conn.close()
    return medians("over HTTP (serve --workers 1, keep-alive)", samples)


def probe(requests: int) -> bool:
    print(f"unknown key id vs a real id with a wrong secret, PostgreSQL, {UNKNOWN_IDS} repeated unknown ids,"
          f" medians of per-request times (target: within {TARGET_DIFFERENCE:.0%})")
    with pg_schema() as url, tempfile.TemporaryDirectory() as tmp:
        store = open_store(url)
        store.migrate()
        real_id = issue_key(store, name="bench", scopes=["secret:read"]).record.id
        store.close()
        results = probe_in_process(url, real_id, requests, Path(tmp))
        results["over HTTP"] = probe_over_http(url, real_id, requests, Path(tmp) / "http")
    now = [d for label, d in results.items() if "before" not in label]
    ok = all(abs(d) < TARGET_DIFFERENCE for d in now)
    print(f"  with the negative cache: {'PASS' if ok else 'FAIL'} (|difference| < {TARGET_DIFFERENCE:.0%})")
    return ok


# -- audit growth -------------------------------------------------------------------------------


def audit_growth(mints: int) -> None:
    print(f"audit trail growth per {mints:,} token mints (POST /tokens, one key, in process, SQLite)")
    for label, one_row_each in (("summarised per key and hour (keygate now)", False),
                                ("one row per mint (keygate before)", True)):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "keygate.db"
            store = open_store(f"sqlite:///{db}")
            store.migrate()
            key = issue_key(store, name="minter", scopes=["data:read"])
            if one_row_each:
                store.summarize = KeyStore.summarize.__get__(store)  # type: ignore[method-assign]
            app = create_app({"DATABASE_URL": f"sqlite:///{db}", "INSTANCE_PATH": tmp,
                              "DEFAULT_RATE_LIMIT": HUGE_LIMIT}, store=store)
            client = app.test_client()
            rows_before, bytes_before = _audit_size(store, db)
            started = time.perf_counter()
            for _ in range(mints):
                assert client.post("/tokens", headers={"API-Key": key.plaintext}).status_code == 201
            seconds = time.perf_counter() - started
            rows, size = _audit_size(store, db)
            print(f"  {label:<44} +{rows - rows_before:>7,} rows  +{(size - bytes_before) / 1e6:6.2f} MB"
                  f"  ({mints / seconds:,.0f} mints/s)")
            app.extensions["keygate.usage"].close()
            app.extensions["keygate.retention"].close()
            app.extensions["keygate.ratelimits"].limiter.close()
            store.close()


def _audit_size(store: Any, db: Path) -> tuple[int, int]:
    """Rows in audit_events, and the database's bytes once the WAL is folded into it."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        rows = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0]
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return rows, db.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["probe", "audit", "both"], default="both")
    parser.add_argument("--requests", type=int, default=3000, help="of each kind (at least 2,000 for the record)")
    parser.add_argument("--mints", type=int, default=10_000)
    args = parser.parse_args(argv)
    print(f"keygate hardening bench: Python {sys.version.split()[0]}, load average "
          f"{os.getloadavg()[0]:.1f}")
    ok = True
    if args.what in ("probe", "both"):
        ok = probe(args.requests)
    if args.what in ("audit", "both"):
        audit_growth(args.mints)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
