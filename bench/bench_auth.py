#!/usr/bin/env python
"""The in-process cost of API-key authentication per request.

For every store fixture (an SQLite file holding N keys) and every scenario (a
kind of authenticated request), this times ``GET /secret`` against a baseline:
the same Flask-RESTX ``Api`` with one extra ``Resource`` that returns the same
body without ``@auth.require``. Requests go straight into ``app.wsgi_app`` with
a prebuilt WSGI environ (no test client, no sockets), so what differs between
the two routes is the auth decorator and nothing else.

Method: median over many batches of ``--batch`` requests; batches of every
(fixture, route) pair are interleaved in a shuffled order each round, so
machine noise lands on all of them alike; ``gc`` is off while a batch runs.

    python bench/bench_auth.py                  # 1,000 and 1,000,000 keys
    python bench/bench_auth.py --quick          # smoke test: fewer, smaller batches
    python bench/bench_auth.py --keys 1000 --profile

Adding a scenario: append a ``Scenario`` to ``SCENARIOS`` (its credentials are
WSGI environ entries, cycled round-robin; ``make_app`` picks the app variant,
e.g. one that keeps rate limits and usage on). Adding a backend: write a
function like ``sqlite_fixture`` returning a ``Fixture``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from flask import Flask  # noqa: E402
from flask_restx import Namespace, Resource  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from api.app import create_app  # noqa: E402
from api.namespaces import pages  # noqa: E402
from keys.auth import KeyAuth  # noqa: E402
from keys.keyformat import ALPHABET, ID_LENGTH, generate_key, hash_key  # noqa: E402
from keys.model import Principal  # noqa: E402
from keys.scopes import DATA_READ, SECRET_READ  # noqa: E402
from keys.store import SCHEMA_VERSION  # noqa: E402
from keys.store.schema import keys_table  # noqa: E402
from keys.store.sql import SqlKeyStore  # noqa: E402

CACHE_DIR = ROOT / "bench" / ".cache"
CACHE_FORMAT = 2  # bump when _build_sqlite writes different rows: cached stores are rebuilt
DISTINCT_KEYS = 10_000  # real keys per store, used round-robin by the "distinct keys" scenario
#: Scopes of the real keys: /secret needs secret:read; data:read lets a token scenario use /data.
KEY_SCOPES = f"{SECRET_READ} {DATA_READ}"
BASELINE_PATH = "/bench-baseline"

TARGET_RATIO = 1.1  # authenticated request with the largest store / with the smallest


# -- store fixtures ------------------------------------------------------------------


@dataclass
class Fixture:
    """A store with ``n_keys`` keys, of which ``keys`` are plaintexts that verify."""

    label: str
    n_keys: int
    database_url: str
    keys: list[str]


def key_id(plaintext: str) -> str:
    return plaintext[3:3 + ID_LENGTH]


def _key_row(key_id: str, name: str, key_hash: str, now: float) -> dict[str, Any]:
    # Every column, so executemany sees one parameter shape for every row.
    return {
        "id": key_id, "name": name, "key_hash": key_hash, "scopes": KEY_SCOPES,
        "created_at": now, "expires_at": None, "revoked_at": None, "last_used_at": None,
        "use_count": 0, "rate_limit": None, "allowed_ips": "", "replaces": None, "generation": 0,
    }


def _build_sqlite(path: Path, n_keys: int) -> list[str]:
    """Write an SQLite store of ``n_keys`` keys to ``path``; the plaintexts of the real ones.

    ``min(n_keys, DISTINCT_KEYS)`` keys are real (generated like issued keys);
    the rest are filler rows with random base62 ids and random hex hashes. Real
    rows sit at random positions among the filler, so their table pages are as
    scattered as in a store that grew over time.
    """
    store = SqlKeyStore(f"sqlite:///{path}")
    store.migrate()
    store.close()

    n_real = min(n_keys, DISTINCT_KEYS)
    real = [generate_key() for _ in range(n_real)]
    rng = random.Random(n_keys)  # filler needs no cryptographic randomness
    real_at = dict(zip(sorted(rng.sample(range(n_keys), n_real)), real))
    now = time.time()

    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _fast(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA synchronous = OFF")  # a crash here just means a rebuild

    chunk, per_transaction = 20_000, 200_000
    insert = keys_table.insert()
    try:
        for start in range(0, n_keys, per_transaction):
            with engine.begin() as conn:
                for lo in range(start, min(start + per_transaction, n_keys), chunk):
                    rows = []
                    for i in range(lo, min(lo + chunk, n_keys)):
                        key = real_at.get(i)
                        if key is not None:
                            rows.append(_key_row(key.key_id, f"bench-{i}", hash_key(key.plaintext), now))
                        else:
                            rows.append(_key_row("".join(rng.choices(ALPHABET, k=ID_LENGTH)),
                                                 f"filler-{i}", rng.randbytes(32).hex(), now))
                    conn.execute(insert, rows)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return [key.plaintext for key in real]


def sqlite_fixture(n_keys: int, *, rebuild: bool = False) -> Fixture:
    """An SQLite store of ``n_keys`` keys, cached under bench/.cache/ by key count."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"sqlite-{n_keys}-keys-schema{SCHEMA_VERSION}-v{CACHE_FORMAT}"
    db, sidecar = CACHE_DIR / f"{stem}.db", CACHE_DIR / f"{stem}.keys.json"
    label = f"{n_keys:,} keys"
    if rebuild or not (db.exists() and sidecar.exists()):
        # This store in any format, and what a killed build left behind.
        for pattern in (f"sqlite-{n_keys}-keys-*", f".building-sqlite-{n_keys}-keys-*"):
            for stale in CACHE_DIR.glob(pattern):
                stale.unlink()
        tmp = CACHE_DIR / f".building-{stem}-{os.getpid()}.db"
        print(f"building {db.relative_to(ROOT)} ({label}) ...", end=" ", flush=True)
        started = time.perf_counter()
        try:
            plaintexts = _build_sqlite(tmp, n_keys)
            for suffix in ("-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            tmp.rename(db)
        except BaseException:
            for leftover in CACHE_DIR.glob(f"{tmp.name}*"):
                leftover.unlink()
            raise
        tmp_sidecar = sidecar.with_suffix(".tmp")
        tmp_sidecar.write_text(json.dumps({"n_keys": n_keys, "keys": plaintexts}))
        tmp_sidecar.rename(sidecar)
        print(f"{time.perf_counter() - started:.1f} s")
    data = json.loads(sidecar.read_text())
    return Fixture(label, n_keys, f"sqlite:///{db}", data["keys"])


# -- the app under test ----------------------------------------------------------------


@dataclass
class BenchApp:
    app: Flask
    auth: KeyAuth
    baseline_path: str


def _caller_body(message: str, p: Principal) -> dict[str, Any]:
    # The body pages._body builds from g.principal, built here from a fixed principal.
    return {
        "message": message,
        "caller": {"id": p.key_id, "name": p.name, "scopes": list(p.scopes), "via": p.via},
    }


def _baseline_namespace(principal: Principal) -> Namespace:
    ns = Namespace("bench", path=BASELINE_PATH, description="benchmark baseline: /secret without auth")

    @ns.route("")
    class Baseline(Resource):
        # The same documentation decorators as /secret (RESTX reads them per request), no auth.
        @ns.doc(security=pages.HEADER_ONLY)
        @ns.response(200, "Welcome")
        def get(self) -> dict[str, Any]:
            return _caller_body("Welcome to the secret page!", principal)

    return ns


@contextlib.contextmanager
def _with_baseline_namespace(principal: Principal) -> Iterator[None]:
    """``create_app`` registers one more namespace, on the same ``Api``, while this is open."""
    original = pages.namespaces

    def namespaces(auth: KeyAuth) -> list[Namespace]:
        return [*original(auth), _baseline_namespace(principal)]

    pages.namespaces = namespaces  # type: ignore[assignment]
    try:
        yield
    finally:
        pages.namespaces = original  # type: ignore[assignment]


def auth_only_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """The real app, minus the after-authentication hooks (rate limits, usage counts),
    so its rows measure key authentication alone."""
    config = {
        "DATABASE_URL": fixture.database_url,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "INSTANCE_PATH": str(instance_path),
        "TRUSTED_PROXIES": "0",
        "RATELIMIT_STORAGE_URL": "",
    }
    store = SqlKeyStore(fixture.database_url)
    record = store.get(key_id(fixture.keys[0]))
    store.close()
    assert record is not None, f"{fixture.database_url}: the first bench key is missing"
    principal = Principal(record.id, record.name, record.scopes, "header", record)
    with _with_baseline_namespace(principal):
        app = create_app(config)
    auth: KeyAuth = app.extensions["keygate"]
    auth._after_auth.clear()  # noqa: SLF001 (a "limits + usage" variant would keep them)
    return BenchApp(app, auth, BASELINE_PATH)


# -- scenarios --------------------------------------------------------------------------


def api_key_header(key: str) -> dict[str, str]:
    return {"HTTP_API_KEY": key}


@dataclass(frozen=True)
class Scenario:
    """One kind of authenticated request, compared against the app's baseline route."""

    name: str
    path: str
    #: WSGI environ entries for each request, cycled round-robin (one dict = one repeated
    #: credential); given the store and the app (whose signer mints query tokens).
    credentials: Callable[[Fixture, BenchApp], list[dict[str, str]]]
    #: PASS/FAIL limit on the median auth overhead, µs per request.
    target_us: float
    make_app: Callable[[Fixture, Path], BenchApp] = auth_only_app


def store_path_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """``auth_only_app`` with verification reading the store directly, bypassing the
    per-process cache of recently verified keys, so every request pays for a lookup
    (the 1,000-key store's keys would otherwise all fit in the cache)."""
    bench = auth_only_app(fixture, instance_path)
    bench.auth.lookup = bench.auth.store
    return bench


SCENARIOS = [
    # As deployed: a key used again is verified from the per-process cache (keys/cache.py).
    Scenario("repeated key", "/secret", lambda fx, _: [api_key_header(fx.keys[0])], target_us=15),
    # Round-robin over up to 10,000 keys with the cache bypassed: the store's own cost.
    Scenario("distinct keys", "/secret", lambda fx, _: [api_key_header(k) for k in fx.keys[:DISTINCT_KEYS]],
             target_us=40, make_app=store_path_app),
]


# -- timing -----------------------------------------------------------------------------


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
    pass


def _environ(path: str) -> dict[str, Any]:
    return EnvironBuilder(path=path, method="GET", headers={"Accept": "application/json"}).get_environ()


@dataclass
class Case:
    """One timed series: requests to ``path`` of one app, each a copy of one template
    environ plus the next entry of ``extras`` (its credential), round-robin."""

    label: str
    wsgi: Callable[..., Any]
    path: str
    extras: list[dict[str, str]]
    samples: list[float] = field(default_factory=list)  # ns per request, one per batch
    position: int = 0

    def __post_init__(self) -> None:
        self.template = _environ(self.path)

    def next_batch(self, size: int) -> list[dict[str, str]]:
        n = len(self.extras)
        batch = [self.extras[(self.position + i) % n] for i in range(size)]
        self.position = (self.position + size) % n
        return batch


def run_batch(case: Case, batch: list[dict[str, str]]) -> int:
    """Serve one request per entry of ``batch``; elapsed ns.

    Every request gets a fresh environ, as from a server: one shared template copied,
    plus its credential. (Ten thousand prebuilt environs would make the distinct-key
    series pay for memory-cache misses on the environs themselves, not on auth.)
    """
    wsgi, template, start_response = case.wsgi, case.template, _start_response
    t0 = time.perf_counter_ns()
    for extra in batch:
        environ = template.copy()
        environ.update(extra)
        body = wsgi(environ, start_response)
        for _ in body:
            pass
        body.close()
    return time.perf_counter_ns() - t0


def check_case(case: Case, expect_caller: bool) -> None:
    """Every request of the case gets a 200 for the right caller (and warms the caches)."""
    for extra in case.extras:
        status: list[str] = []
        environ = case.template.copy()
        environ.update(extra)
        body = case.wsgi(environ, lambda s, h, e=None: status.append(s))
        data = b"".join(body)
        body.close()
        if not status or not status[0].startswith("200"):
            sys.exit(f"{case.label}: expected 200, got {status[0] if status else '?'}: {data[:300]!r}")
        key = extra.get("HTTP_API_KEY")
        if expect_caller and key is not None:
            caller = json.loads(data)["caller"]["id"]
            if caller != key_id(key):
                sys.exit(f"{case.label}: answered for {caller}, not for the key sent")


@dataclass
class Row:
    fixture: Fixture
    scenario: Scenario
    n_distinct: int
    baseline: Case
    authed: Case

    @property
    def baseline_us(self) -> float:
        return statistics.median(self.baseline.samples) / 1000

    @property
    def authed_us(self) -> float:
        return statistics.median(self.authed.samples) / 1000

    @property
    def overhead_us(self) -> float:
        return self.authed_us - self.baseline_us

    @property
    def stderr_us(self) -> float:
        """Rough standard error of the overhead: from the spread of the per-round
        authed − baseline differences (IQR / 1.349 ≈ σ; a median's error ≈ 1.25 σ / √n)."""
        diffs = [a - b for a, b in zip(self.authed.samples, self.baseline.samples)]
        if len(diffs) < 4:
            return float("nan")
        q1, _, q3 = statistics.quantiles(diffs, n=4)
        return 1.2533 * (q3 - q1) / 1.349 / len(diffs) ** 0.5 / 1000


def measure(cases: list[Case], *, rounds: int, batch: int, warmup: int, seed: int = 1) -> None:
    """Interleave ``rounds`` batches of every case, in a fresh random order each round."""
    rng = random.Random(seed)
    order = list(cases)
    gc.collect()
    gc.freeze()  # setup objects (apps, stores, key lists) need no scanning between batches
    gc.disable()
    try:
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for case in order:
                extras = case.next_batch(batch)
                gc.collect()
                elapsed = run_batch(case, extras)
                if r >= warmup:
                    case.samples.append(elapsed / batch)
    finally:
        gc.enable()
        gc.unfreeze()


# -- report -------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[Row]) -> bool:
    """Print the tables; True when every target passes."""
    ok = True
    print()
    print(f"{'store':>16}  {'scenario':<24} {'baseline':>9} {'authed':>9} {'overhead':>9} {'±':>5}"
          f"  {'target':>8}")
    for row in rows:
        passed = row.overhead_us <= row.scenario.target_us
        ok &= passed
        name = row.scenario.name + (f" ({row.n_distinct:,})" if row.n_distinct > 1 else "")
        print(f"{row.fixture.label:>16}  {name:<24} {row.baseline_us:>9.1f} {row.authed_us:>9.1f}"
              f" {row.overhead_us:>9.1f} {row.stderr_us:>5.1f}  ≤{row.scenario.target_us:>4.0f} µs"
              f"  {_verdict(passed)}")
    print("(µs per request, medians over the batches; ± is a rough standard error of the overhead)")

    fixtures = sorted({id(r.fixture): r.fixture for r in rows}.values(), key=lambda f: f.n_keys)
    if len(fixtures) >= 2:
        small, large = fixtures[0], fixtures[-1]
        print()
        print(f"{'scenario':<16} {'overhead ' + _short(small):>16} {'overhead ' + _short(large):>16}"
              f" {'ratio':>6} {'per-request ratio':>18}  target")
        for scenario in SCENARIOS:
            a = next((r for r in rows if r.fixture is small and r.scenario is scenario), None)
            b = next((r for r in rows if r.fixture is large and r.scenario is scenario), None)
            if a is None or b is None:
                continue
            ratio = b.overhead_us / a.overhead_us if a.overhead_us > 0 else float("inf")
            per_request = b.authed_us / a.authed_us
            # The target reads "1,000,000 keys cost at most 1.1x what 1,000 keys cost": the
            # cost of an authenticated request. The auth-overhead ratio is shown beside it.
            passed = per_request <= TARGET_RATIO
            ok &= passed
            print(f"{scenario.name:<16} {a.overhead_us:>13.1f} µs {b.overhead_us:>13.1f} µs {ratio:>5.2f}×"
                  f" {per_request:>17.2f}×  ≤{TARGET_RATIO}×  {_verdict(passed)}")
        print(f"(per-request ratio, the target: cost of an authenticated request with {large.label} / "
              f"with {small.label}; ratio: the same for the auth overhead alone)")
    return ok


def _short(fixture: Fixture) -> str:
    n = fixture.n_keys
    for size, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def profile(row: Row, batches: int, batch: int) -> None:
    """cProfile a few batches of one authed case: where an authenticated request's time goes."""
    profiler = cProfile.Profile()
    gc.disable()
    try:
        for _ in range(batches):
            extras = row.authed.next_batch(batch)
            profiler.enable()
            run_batch(row.authed, extras)
            profiler.disable()
    finally:
        gc.enable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]

    def share(path_end: str, func: str) -> str:
        t = sum(v[3] for (f, _, fn), v in stats.stats.items()  # type: ignore[attr-defined]
                if f.replace(os.sep, "/").endswith(path_end) and fn == func)
        return f"{t / total:.0%}"

    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumulative").print_stats(r"keys[/\\]", 20)
    print(f"\nprofile: {row.fixture.label}, {row.scenario.name}, {batches * batch} requests "
          "(cProfile inflates every call; compare shares, not absolute times)")
    print(f"share of request time: auth decorator {share('keys/auth.py', 'wrapper')}, "
          f"store get {share('keys/store/sql.py', 'get')}, parse_key {share('keys/keyformat.py', 'parse_key')}")
    print(out.getvalue())


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000, 1_000_000], metavar="N",
                        help="key counts of the SQLite stores to measure (default: 1000 1000000)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller batches: a smoke test")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached stores")
    parser.add_argument("--rounds", type=int, help="timed batches per series (default 300; quick 10)")
    parser.add_argument("--batch", type=int, help="requests per batch (default 200; quick 50)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, cProfile distinct-key requests on the largest store")
    args = parser.parse_args(argv)
    if min(args.keys) < 1:
        parser.error("--keys: every key count must be at least 1")
    rounds = args.rounds or (10 if args.quick else 300)
    batch = args.batch or (50 if args.quick else 200)
    warmup = 2 if args.quick else 5

    print(f"keygate auth benchmark: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{_cpu()} ({os.cpu_count()} CPUs)")
    print(f"{rounds} rounds × {batch} requests per series, after {warmup} warm-up rounds")
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before starting: other processes compete for the CPU, "
              "expect noisy numbers")

    started = time.perf_counter()
    fixtures = [sqlite_fixture(n, rebuild=args.rebuild) for n in sorted(set(args.keys))]
    instance = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    rows: list[Row] = []
    cases: list[Case] = []
    apps: list[BenchApp] = []
    try:
        for fixture in fixtures:
            built: dict[Any, tuple[BenchApp, Case]] = {}
            for scenario in SCENARIOS:
                if scenario.make_app not in built:
                    bench_app = scenario.make_app(fixture, instance / f"{len(apps)}")
                    apps.append(bench_app)
                    baseline = Case(f"{fixture.label} baseline", bench_app.app.wsgi_app,
                                    bench_app.baseline_path, [api_key_header(fixture.keys[0])])
                    check_case(baseline, expect_caller=False)
                    built[scenario.make_app] = (bench_app, baseline)
                    cases.append(baseline)
                bench_app, baseline = built[scenario.make_app]
                credentials = scenario.credentials(fixture, bench_app)
                authed = Case(f"{fixture.label} {scenario.name}", bench_app.app.wsgi_app,
                              scenario.path, credentials)
                check_case(authed, expect_caller=True)
                cases.append(authed)
                rows.append(Row(fixture, scenario, len(credentials), baseline, authed))
        print(f"stores ready and every request checked in {time.perf_counter() - started:.1f} s; timing ...",
              flush=True)
        measure(cases, rounds=rounds, batch=batch, warmup=warmup)
        ok = report(rows)
        if args.profile:
            largest = max(rows, key=lambda r: (r.fixture.n_keys, r.n_distinct))
            profile(largest, batches=20 if args.quick else 40, batch=batch)
    finally:
        for bench_app in apps:
            bench_app.auth.store.close()
        shutil.rmtree(instance, ignore_errors=True)
    print(f"\n{'all targets met' if ok else 'SOME TARGETS MISSED'} "
          f"({time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.1f}"
          f"{'; --quick: indicative only' if args.quick else ''})")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
