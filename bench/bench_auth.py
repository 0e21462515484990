#!/usr/bin/env python
"""The in-process cost of API-key authentication per request.

For every store fixture (an SQLite file holding N keys; with ``--postgres`` also
a PostgreSQL schema) and every scenario (a kind of authenticated request), this
times an authenticated request (``GET /secret``, or ``/data`` for the header-vs-
query-token comparison) against a baseline: the same Flask-RESTX ``Api`` with
one extra ``Resource`` that returns the same body without ``@auth.require``.
Requests go straight into ``app.wsgi_app`` with a prebuilt WSGI environ (no test
client, no sockets), so what differs between the two routes is the auth
decorator and nothing else.

Besides the per-row targets it checks two comparisons within one run: a query
token's auth overhead against a header key's on the same route (≤ 1.5×), and
what rate limits + usage counting add to an authenticated request (≤ 10 µs).

Method: median over many batches of ``--batch`` requests; batches of every
(fixture, route) pair are interleaved in a shuffled order each round, so
machine noise lands on all of them alike; ``gc`` is off while a batch runs.

    python bench/bench_auth.py                  # 1,000 and 1,000,000 keys
    python bench/bench_auth.py --quick          # smoke test: fewer, smaller batches
    python bench/bench_auth.py --keys 1000 --profile
    python bench/bench_auth.py --postgres       # also PostgreSQL at 127.0.0.1:5432, database test
    python bench/bench_auth.py --keys 1000 --profile "query token on /data"

Adding a scenario: append a ``Scenario`` to ``SCENARIOS`` (its credentials are
WSGI environ entries, cycled round-robin; ``make_app`` picks the app variant,
e.g. ``limits_usage_app``, which keeps rate limits and usage on). Adding a
backend: write a function like ``sqlite_fixture`` or ``postgres_fixture``
returning a ``Fixture``.
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
from flask_restx import Namespace  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from api.app import create_app  # noqa: E402
from api.namespaces import pages  # noqa: E402
from api.restx import Resource  # noqa: E402
from api.scopes import DATA_READ, SECRET_READ  # noqa: E402
from keys.auth import KeyAuth  # noqa: E402
from keys.keyformat import ALPHABET, ID_LENGTH, generate_key, hash_key  # noqa: E402
from keys.model import Principal  # noqa: E402
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
TARGET_TOKEN_RATIO = 1.5  # query token's auth overhead / a header key's, same route (issue 3)
TARGET_LIMITS_US = 10.0  # what rate limits + usage counting add to an authenticated request (issue 4)
TARGET_METRICS_US = 3.0  # what request ids + Prometheus metrics add to a request (issue 15)
#: A default limit no batch can reach: the limiter does its full work and never refuses.
HUGE_RATE_LIMIT = "10000000/minute"

PG_URL = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
PG_SCHEMA_PREFIX = "keygate_bench_"


# -- store fixtures ------------------------------------------------------------------


@dataclass
class Fixture:
    """A store with ``n_keys`` keys, of which ``keys`` are plaintexts that verify."""

    label: str
    n_keys: int
    database_url: str
    keys: list[str]
    #: "sqlite" rows are held to the targets; "postgresql" rows are measured only (issue 6).
    backend: str = "sqlite"


def key_id(plaintext: str) -> str:
    return plaintext[3:3 + ID_LENGTH]


def _key_row(key_id: str, name: str, key_hash: str, now: float) -> dict[str, Any]:
    # Every column, so executemany sees one parameter shape for every row.
    return {
        "id": key_id, "name": name, "key_hash": key_hash, "scopes": KEY_SCOPES,
        "created_at": now, "expires_at": None, "revoked_at": None, "last_used_at": None,
        "use_count": 0, "rate_limit": None, "allowed_ips": "", "replaces": None, "generation": 0,
    }


def _fixture_rows(n_keys: int) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The plaintexts of a store's real keys, and all of its ``n_keys`` rows in insertion order.

    ``min(n_keys, DISTINCT_KEYS)`` keys are real (generated like issued keys);
    the rest are filler rows with random base62 ids and random hex hashes. Real
    rows sit at random positions among the filler, so their table pages are as
    scattered as in a store that grew over time.
    """
    n_real = min(n_keys, DISTINCT_KEYS)
    real = [generate_key() for _ in range(n_real)]
    rng = random.Random(n_keys)  # filler needs no cryptographic randomness
    real_at = dict(zip(sorted(rng.sample(range(n_keys), n_real)), real))
    now = time.time()

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(n_keys):
            key = real_at.get(i)
            if key is not None:
                yield _key_row(key.key_id, f"bench-{i}", hash_key(key.plaintext), now)
            else:
                yield _key_row("".join(rng.choices(ALPHABET, k=ID_LENGTH)),
                               f"filler-{i}", rng.randbytes(32).hex(), now)

    return [key.plaintext for key in real], rows()


def _build_sqlite(path: Path, n_keys: int) -> list[str]:
    """Write an SQLite store of ``n_keys`` keys to ``path``; the plaintexts of the real ones."""
    store = SqlKeyStore(f"sqlite:///{path}")
    store.migrate()
    store.close()
    plaintexts, rows = _fixture_rows(n_keys)

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
                    conn.execute(insert, [next(rows) for _ in range(lo, min(lo + chunk, n_keys))])
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return plaintexts


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


@contextlib.contextmanager
def postgres_fixture(n_keys: int) -> Iterator[Fixture]:
    """A PostgreSQL store of ``n_keys`` keys in a schema of its own, dropped on the way out.

    Built on every run (1,000,000 rows by ``COPY`` take ~5 s), in a schema named after
    this process, so concurrent runs and the test suite's schemas never collide. A run
    killed hard leaves its ``keygate_bench_*`` schema behind; ``DROP SCHEMA ... CASCADE``.
    """
    import psycopg  # only --postgres needs the driver

    schema = f"{PG_SCHEMA_PREFIX}{n_keys}_{os.getpid()}_{secrets.token_hex(4)}"
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    label = f"PG {n_keys:,} keys"
    print(f"building PostgreSQL schema {schema} ({n_keys:,} keys) ...", end=" ", flush=True)
    started = time.perf_counter()
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        sys.exit(f"--postgres: cannot reach {PG_URL} ({' '.join(str(e).split())})")
    try:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        store = SqlKeyStore(url)
        store.migrate()
        store.close()
        plaintexts, rows = _fixture_rows(n_keys)
        columns = [c.name for c in keys_table.columns]
        with psycopg.connect(PG_URL, options=f"-csearch_path={schema}") as conn:  # one transaction
            with conn.cursor() as cur:
                with cur.copy(f"COPY {keys_table.name} ({', '.join(columns)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row([row[c] for c in columns])
            conn.execute(f"ANALYZE {keys_table.name}")
        print(f"{time.perf_counter() - started:.1f} s")
        print(f"PostgreSQL {admin.info.parameter_status('server_version')} at {admin.info.host}:"
              f"{admin.info.port}, database {admin.info.dbname}")
        yield Fixture(label, n_keys, url, plaintexts, backend="postgresql")
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


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
    class Baseline(Resource):  # keygate's, as /secret's: RESTX's stock one negotiates again (11.6 µs)
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


def _bench_app(fixture: Fixture, instance_path: Path, **settings: str) -> BenchApp:
    """The real app (``create_app``) on the fixture's store, plus the baseline route."""
    config = {
        "DATABASE_URL": fixture.database_url,
        "SECRET_KEY": secrets.token_urlsafe(48),
        "INSTANCE_PATH": str(instance_path),
        "TRUSTED_PROXIES": "0",
        "RATELIMIT_STORAGE_URL": "",
        **settings,
    }
    store = SqlKeyStore(fixture.database_url)
    record = store.get(key_id(fixture.keys[0]))
    store.close()
    assert record is not None, f"{fixture.database_url}: the first bench key is missing"
    principal = Principal(record.id, record.name, record.scopes, "header", record)
    with _with_baseline_namespace(principal):
        app = create_app(config)
    return BenchApp(app, app.extensions["keygate"].auth, BASELINE_PATH)


class _NoUsage:
    def hit(self, key_id: str) -> None:
        pass


def auth_only_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """The real app, minus the after-authentication hooks (rate limits, usage counts),
    so its rows measure key authentication alone."""
    bench = _bench_app(fixture, instance_path)
    bench.auth._after_identification.clear()  # noqa: SLF001
    bench.auth._after_auth.clear()  # noqa: SLF001
    bench.app.response_class.usage = _NoUsage()  # type: ignore[attr-defined]  # uses are counted as responses go out
    return bench


def limits_usage_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """The real app as deployed: every authorised request also hits the embedded
    shared-memory rate limiter (GCRA, ``flock``) and counts usage for the write-behind
    flusher. The default limit is far above what the batches send, so nothing is refused."""
    bench = _bench_app(fixture, instance_path, DEFAULT_RATE_LIMIT=HUGE_RATE_LIMIT)
    limits = bench.app.extensions["keygate.ratelimits"]
    assert bench.auth._after_identification == [limits._on_request], "expected the rate-limit hook"  # noqa: SLF001
    assert bench.auth._after_auth == [] and bench.app.response_class.usage is limits.usage  # noqa: SLF001
    assert type(limits.limiter).__name__ == "SharedMemoryLimiter", type(limits.limiter)
    return bench


def limits_usage_bare_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """``limits_usage_app`` without what issue 15 added to every request: the request-id
    and metrics middleware (``api/instrument.py``) and the backends' outage bookkeeping."""
    from api.instrument import Instrumented

    bench = limits_usage_app(fixture, instance_path)
    assert isinstance(bench.app.wsgi_app, Instrumented)
    bench.app.wsgi_app = bench.app.wsgi_app.app  # type: ignore[method-assign]
    bench.app.extensions["keygate.ratelimits"].backends = None
    return bench


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
    #: PASS/FAIL limit on the median auth overhead, µs per request (None: judged by a
    #: comparison between rows instead; see ``report``). PostgreSQL rows have no targets.
    target_us: float | None
    make_app: Callable[[Fixture, Path], BenchApp] = auth_only_app
    #: False: measured on the smallest SQLite store only (its cost does not depend on the
    #: store's size: the credential is verified from the per-process cache).
    every_store: bool = True
    #: Response headers every authenticated request must carry (checked before timing).
    expect_headers: tuple[str, ...] = ()


def store_path_app(fixture: Fixture, instance_path: Path) -> BenchApp:
    """``auth_only_app`` with verification reading the store directly, bypassing the
    per-process cache of recently verified keys, so every request pays for a lookup
    (the 1,000-key store's keys would otherwise all fit in the cache)."""
    bench = auth_only_app(fixture, instance_path)
    bench.app.extensions["keygate"].lookup = bench.auth.store
    return bench


def query_token(fx: Fixture, bench: BenchApp) -> list[dict[str, str]]:
    """One ``data:read`` token minted once, by the app's own signer, from the first key."""
    signer = bench.app.extensions["keygate.signer"]
    record = bench.auth.store.get(key_id(fx.keys[0]))
    assert record is not None
    return [{"QUERY_STRING": "token=" + signer.mint(record, [DATA_READ]).token}]


# Rows that the report compares with each other (issues 3 and 4).
TOKEN_HEADER, TOKEN_QUERY = "header key on /data", "query token on /data"
LIMITS_BASE, LIMITS_ON = "repeated key", "limits + usage"
METRICS_OFF = "limits + usage, no metrics"

SCENARIOS = [
    # As deployed: a key used again is verified from the per-process cache (keys/cache.py).
    Scenario(LIMITS_BASE, "/secret", lambda fx, _: [api_key_header(fx.keys[0])], target_us=15),
    # Round-robin over up to 10,000 keys with the cache bypassed: the store's own cost.
    Scenario("distinct keys", "/secret", lambda fx, _: [api_key_header(k) for k in fx.keys[:DISTINCT_KEYS]],
             target_us=40, make_app=store_path_app),
    # Issue 3: the same key on /data, in the header, then as a query token minted from it;
    # same route and same cached record, so the two overheads differ by the credential only.
    Scenario(TOKEN_HEADER, "/data", lambda fx, _: [api_key_header(fx.keys[0])],
             target_us=None, every_store=False),
    Scenario(TOKEN_QUERY, "/data", query_token, target_us=None, every_store=False),
    # Issue 4: the repeated-key request with rate limiting and usage counting on, compared
    # with the auth-only "repeated key" row of the same store.
    Scenario(LIMITS_ON, "/secret", lambda fx, _: [api_key_header(fx.keys[0])],
             target_us=None, make_app=limits_usage_app, every_store=False,
             expect_headers=("RateLimit", "RateLimit-Policy", "X-RateLimit-Remaining", "X-Request-ID")),
    # Issue 15: the same request without the request id and the metrics, compared with the
    # "limits + usage" row (the app as deployed).
    Scenario(METRICS_OFF, "/secret", lambda fx, _: [api_key_header(fx.keys[0])],
             target_us=None, make_app=limits_usage_bare_app, every_store=False,
             expect_headers=("RateLimit", "RateLimit-Policy", "X-RateLimit-Remaining")),
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
        if hasattr(body, "close"):  # PEP 3333: an iterable that has close() must be closed
            body.close()
    return time.perf_counter_ns() - t0


def check_case(case: Case, fixture: Fixture | None = None, headers: tuple[str, ...] = ()) -> None:
    """Every request of the case gets a 200 (carrying ``headers``) and, given the fixture,
    for the right caller: the key sent in the header, or the first key for a query token.
    (It also warms the caches.)"""
    for extra in case.extras:
        status: list[str] = []
        got: list[list[tuple[str, str]]] = []
        environ = case.template.copy()
        environ.update(extra)
        body = case.wsgi(environ, lambda s, h, e=None: (status.append(s), got.append(h)))
        data = b"".join(body)
        if hasattr(body, "close"):  # PEP 3333: an iterable that has close() must be closed
            body.close()
        if not status or not status[0].startswith("200"):
            sys.exit(f"{case.label}: expected 200, got {status[0] if status else '?'}: {data[:300]!r}")
        missing = set(headers) - {name for name, _ in got[0]}
        if missing:
            sys.exit(f"{case.label}: response lacks {', '.join(sorted(missing))}")
        if fixture is None:
            continue
        key = extra.get("HTTP_API_KEY")
        expected = (key_id(key), "header") if key is not None else (key_id(fixture.keys[0]), "token")
        caller = json.loads(data)["caller"]
        if (caller["id"], caller["via"]) != expected:
            sys.exit(f"{case.label}: answered for {caller['id']} via {caller['via']}, expected {expected}")


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
        """Rough standard error of the overhead (see ``paired_stderr_us``)."""
        return paired_stderr_us(self.authed, self.baseline)

    @property
    def target_us(self) -> float | None:
        return self.scenario.target_us if self.fixture.backend == "sqlite" else None


def paired_stderr_us(a: Case, b: Case) -> float:
    """Rough standard error of median(a) − median(b): from the spread of the per-round
    differences (IQR / 1.349 ≈ σ; a median's error ≈ 1.25 σ / √n)."""
    diffs = [x - y for x, y in zip(a.samples, b.samples)]
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
    width = max(16, *(len(r.fixture.label) for r in rows))
    print()
    print(f"{'store':>{width}}  {'scenario':<28} {'baseline':>9} {'authed':>9} {'overhead':>9} {'±':>5}"
          f"  {'target':>8}")
    for row in rows:
        name = row.scenario.name + (f" ({row.n_distinct:,})" if row.n_distinct > 1 else "")
        line = (f"{row.fixture.label:>{width}}  {name:<28} {row.baseline_us:>9.1f} {row.authed_us:>9.1f}"
                f" {row.overhead_us:>9.1f} {row.stderr_us:>5.1f}")
        target = row.target_us
        if target is not None:
            passed = row.overhead_us <= target
            ok &= passed
            line += f"  ≤{target:>4.0f} µs  {_verdict(passed)}"
        else:
            line += f"  {'—':>8}" + ("  (measured only)" if row.fixture.backend != "sqlite" else "")
        print(line)
    print("(µs per request, medians over the batches; ± is a rough standard error of the overhead)")

    sqlite_fixtures = sorted({id(r.fixture): r.fixture for r in rows if r.fixture.backend == "sqlite"}.values(),
                             key=lambda f: f.n_keys)
    if len(sqlite_fixtures) >= 2:
        small, large = sqlite_fixtures[0], sqlite_fixtures[-1]
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

    def row_of(name: str) -> Row | None:
        return next((r for r in rows if r.scenario.name == name and r.fixture.backend == "sqlite"), None)

    header, token = row_of(TOKEN_HEADER), row_of(TOKEN_QUERY)
    if header is not None and token is not None:
        ratio = token.overhead_us / header.overhead_us if header.overhead_us > 0 else float("inf")
        passed = ratio <= TARGET_TOKEN_RATIO
        ok &= passed
        print()
        print(f"query token vs header key, GET /data, {token.fixture.label}, the same key (cached record):")
        print(f"  overhead: header key {header.overhead_us:.1f} ± {header.stderr_us:.1f} µs, "
              f"query token {token.overhead_us:.1f} ± {token.stderr_us:.1f} µs; "
              f"token costs {token.overhead_us - header.overhead_us:+.1f} µs more")
        print(f"  ratio token / header {ratio:.2f}×  target ≤{TARGET_TOKEN_RATIO}×  {_verdict(passed)}")

    limited = row_of(LIMITS_ON)
    plain = None if limited is None else next(
        (r for r in rows if r.fixture is limited.fixture and r.scenario.name == LIMITS_BASE), None)
    if limited is not None and plain is not None:
        delta = limited.authed_us - plain.authed_us
        passed = delta <= TARGET_LIMITS_US
        ok &= passed
        print()
        print(f"rate limit + usage counting, GET /secret, {limited.fixture.label}, repeated key:")
        print(f"  authenticated request: auth only {plain.authed_us:.1f} µs, with limits + usage "
              f"{limited.authed_us:.1f} µs (baselines {plain.baseline_us:.1f} / {limited.baseline_us:.1f})")
        print(f"  added {delta:+.1f} ± {paired_stderr_us(limited.authed, plain.authed):.1f} µs "
              f"(overheads: {limited.overhead_us - plain.overhead_us:+.1f})  "
              f"target ≤{TARGET_LIMITS_US:.0f} µs  {_verdict(passed)}")

    bare = row_of(METRICS_OFF)
    if limited is not None and bare is not None:
        delta = limited.authed_us - bare.authed_us
        passed = delta <= TARGET_METRICS_US
        ok &= passed
        print()
        print(f"request ids + metrics, GET /secret, {limited.fixture.label}, repeated key, limits + usage on:")
        print(f"  authenticated request: without {bare.authed_us:.1f} µs, with {limited.authed_us:.1f} µs; "
              f"unauthenticated baseline: without {bare.baseline_us:.1f} µs, with {limited.baseline_us:.1f} µs")
        print(f"  added {delta:+.1f} ± {paired_stderr_us(limited.authed, bare.authed):.1f} µs "
              f"(to the baseline: {limited.baseline_us - bare.baseline_us:+.1f})  "
              f"target ≤{TARGET_METRICS_US:.0f} µs  {_verdict(passed)}")
        # On a busy machine the medians move by more than this row measures; the fastest
        # tenth of each series is disturbed least (printed, not judged).
        p10 = [statistics.quantiles(c.samples, n=10)[0] / 1000 for c in (limited.authed, bare.authed)]
        print(f"  fastest tenth of the batches: with {p10[0]:.1f} µs, without {p10[1]:.1f} µs, "
              f"added {p10[0] - p10[1]:+.1f} µs")
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
    stats.sort_stats("cumulative").print_stats(r"keys[/\\]|itsdangerous|ratelimits?\.py|usage\.py", 25)
    print(f"\nprofile: {row.fixture.label}, {row.scenario.name}, {batches * batch} requests "
          "(cProfile inflates every call; compare shares, not absolute times)")
    print(f"share of request time: auth decorator {share('keys/auth.py', 'wrapper')}, "
          f"store get {share('keys/store/sql.py', 'get')}, parse_key {share('keys/keyformat.py', 'parse_key')}, "
          f"token verify {share('keys/tokens.py', 'verify')}, "
          f"limits + usage hook {share('api/ratelimits.py', '_on_request')}")
    print(out.getvalue())


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[1_000, 1_000_000], metavar="N",
                        help="key counts of the SQLite stores to measure (default: 1000 1000000)")
    parser.add_argument("--postgres", nargs="?", type=int, const=1_000_000, metavar="N",
                        help="also a PostgreSQL store of N keys (default 1000000) in a schema of its own, "
                             "built and dropped by the run; $KEYGATE_TEST_POSTGRES_URL or "
                             "postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller batches: a smoke test")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached SQLite stores")
    parser.add_argument("--rounds", type=int, help="timed batches per series (default 300; quick 10)")
    parser.add_argument("--batch", type=int, help="requests per batch (default 200; quick 50)")
    parser.add_argument("--profile", nargs="?", const="distinct keys", metavar="SCENARIO",
                        choices=[sc.name for sc in SCENARIOS],
                        help="afterwards, cProfile one scenario's requests on the largest store that "
                             "has it (default: distinct keys)")
    args = parser.parse_args(argv)
    if min(args.keys) < 1 or (args.postgres is not None and args.postgres < 1):
        parser.error("every key count must be at least 1")
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
    with contextlib.ExitStack() as stack:
        fixtures = [sqlite_fixture(n, rebuild=args.rebuild) for n in sorted(set(args.keys))]
        if args.postgres is not None:
            fixtures.append(stack.enter_context(postgres_fixture(args.postgres)))
        smallest_sqlite = min((f for f in fixtures if f.backend == "sqlite"), key=lambda f: f.n_keys)
        instance = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
        rows: list[Row] = []
        cases: list[Case] = []
        apps: list[BenchApp] = []
        try:
            for fixture in fixtures:
                built: dict[Any, tuple[BenchApp, Case]] = {}
                for scenario in SCENARIOS:
                    if not scenario.every_store and fixture is not smallest_sqlite:
                        continue
                    if scenario.make_app not in built:
                        bench_app = scenario.make_app(fixture, instance / f"{len(apps)}")
                        apps.append(bench_app)
                        baseline = Case(f"{fixture.label} baseline", bench_app.app.wsgi_app,
                                        bench_app.baseline_path, [api_key_header(fixture.keys[0])])
                        check_case(baseline)
                        built[scenario.make_app] = (bench_app, baseline)
                        cases.append(baseline)
                    bench_app, baseline = built[scenario.make_app]
                    credentials = scenario.credentials(fixture, bench_app)
                    authed = Case(f"{fixture.label} {scenario.name}", bench_app.app.wsgi_app,
                                  scenario.path, credentials)
                    check_case(authed, fixture, scenario.expect_headers)
                    cases.append(authed)
                    rows.append(Row(fixture, scenario, len(credentials), baseline, authed))
            print(f"stores ready and every request checked in {time.perf_counter() - started:.1f} s; "
                  f"timing {len(cases)} series ...", flush=True)
            measure(cases, rounds=rounds, batch=batch, warmup=warmup)
            ok = report(rows)
            if args.profile:
                candidates = [r for r in rows if r.scenario.name == args.profile]
                target = max(candidates, key=lambda r: (r.fixture.backend == "sqlite", r.fixture.n_keys))
                profile(target, batches=20 if args.quick else 40, batch=batch)
        finally:
            for bench_app in apps:
                bench_app.app.extensions["keygate.usage"].close()  # stop the flusher, write its counts
                bench_app.auth.store.close()
            shutil.rmtree(instance, ignore_errors=True)
    print(f"\n{'all targets met' if ok else 'SOME TARGETS MISSED'} "
          f"({time.perf_counter() - started:.0f} s, load average now {os.getloadavg()[0]:.1f}"
          f"{'; --quick: indicative only' if args.quick else ''})")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
