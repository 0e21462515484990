"""Shared fixtures: one store suite over every backend, apps, CLI and real servers."""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("KEYGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("KEYGATE_REQUIRE_SERVICES") == "1"

# Anything shaped like a key or a query token (keys/keyformat.py, keys/tokens.py).
CREDENTIAL_RE = re.compile(r"kg_[0-9A-Za-z]{20,}|[0-9A-Za-z]{12}\.\d+\.\d{10}\.[\w-]+\.[\w-]{43}")


def assert_no_credentials(text: str, where: str) -> None:
    """No key or token in ``text``; the message shows where, never the value itself.

    Lines that are JSON objects (``KEYGATE_LOG_FORMAT=json``) are scanned once more with
    their strings decoded, so a credential can't hide behind JSON's ``\\u`` escapes."""
    found = CREDENTIAL_RE.search(text)
    assert found is None, f"{where}: a credential-shaped value at offset {found.start()}: " \
        f"{text[max(0, found.start() - 80):found.start()]!r}[…]"
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("{"):
            try:
                decoded = json.loads(line)
            except ValueError:
                continue
            values = json.dumps(decoded, ensure_ascii=False)
            found = CREDENTIAL_RE.search(values)
            assert found is None, f"{where}: line {number}: a credential-shaped value in a JSON field"


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    """Skip when a service is down on a laptop; fail in CI (KEYGATE_REQUIRE_SERVICES=1)."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and KEYGATE_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def strong_secret() -> str:
    """A fresh signing secret that keygate's strength check accepts, always: hexadecimal can't
    spell a placeholder word (a random token_urlsafe contains "test" once in ~16,000)."""
    from keys.strength import weakness

    while weakness(secret := secrets.token_hex(32)) is not None:  # 16 hex digits all but certain
        pass
    return secret


@pytest.fixture(scope="session")
def secret_key() -> str:
    return strong_secret()


BACKENDS = ["memory", "sqlite", "postgresql"]


@functools.lru_cache(maxsize=None)
def _pg_engine():  # noqa: ANN202
    """One engine for the suite's schema housekeeping: a new one per test cost two connections
    (~15 ms each) for every PostgreSQL test."""
    import sqlalchemy as sa

    return sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://", 1), pool_pre_ping=True)


def make_database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty store URL on ``backend``; a PostgreSQL one lives in its own schema."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'keygate.db'}"
    need_service("PostgreSQL", "127.0.0.1", 5432)
    schema = _create_schema()
    request.addfinalizer(lambda: _drop_schema(schema))
    return _schema_url(schema)


def _create_schema() -> str:
    schema = "kg_test_" + uuid.uuid4().hex[:16]
    with _pg_engine().begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    return schema


def _drop_schema(schema: str) -> None:
    with _pg_engine().begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _schema_url(schema: str) -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


class _MigratedSchemas:
    """PostgreSQL schemas already migrated, emptied again for the next test that wants one.

    Migrating a new schema costs ~100 ms of DDL (a third of the PostgreSQL tests' time);
    deleting the rows a test left and putting back the ones the migrations wrote, ~7 ms. A
    schema whose tables or indexes a test changed is dropped, never handed out again."""

    _SHAPE = (
        "SELECT (SELECT string_agg(table_name || '.' || column_name || ':' || data_type || ':' "
        "|| coalesce(column_default, ''), ',' ORDER BY table_name, ordinal_position) "
        "FROM information_schema.columns WHERE table_schema = %(s)s) || '|' || "
        "(SELECT string_agg(indexdef, ';' ORDER BY indexname) FROM pg_indexes WHERE schemaname = %(s)s)"
    )

    def __init__(self) -> None:
        self.idle: list[str] = []
        self.shape: str | None = None
        self.rows: dict[str, list[tuple]] = {}  # what the migrations wrote, by table
        self.sequences: list[str] = []

    def take(self) -> str:
        while self.idle:
            schema = self.idle.pop()
            if self._emptied(schema):
                return schema
            _drop_schema(schema)
        return self._new()

    def give_back(self, schema: str) -> None:
        self.idle.append(schema)

    def drop_all(self) -> None:
        while self.idle:
            _drop_schema(self.idle.pop())

    def _new(self) -> str:
        from keys import open_store

        schema = _create_schema()
        s = open_store(_schema_url(schema))
        s.migrate()
        s.close()
        if self.shape is None:
            with _pg_engine().begin() as conn:
                self.shape = self._shape(conn, schema)
                tables = conn.exec_driver_sql(
                    "SELECT tablename FROM pg_tables WHERE schemaname = %(s)s", {"s": schema}).scalars().all()
                self.rows = {t: [tuple(r) for r in conn.exec_driver_sql(f'SELECT * FROM "{schema}"."{t}"')]
                             for t in tables}
                self.sequences = conn.exec_driver_sql(
                    "SELECT sequencename FROM pg_sequences WHERE schemaname = %(s)s", {"s": schema}).scalars().all()
        return schema

    def _shape(self, conn, schema: str) -> str:  # noqa: ANN001
        # Defaults (sequences) and index definitions name the schema: compare without it.
        return conn.exec_driver_sql(self._SHAPE, {"s": schema}).scalar().replace(f"{schema}.", "")

    def _emptied(self, schema: str) -> bool:
        with _pg_engine().begin() as conn:
            if self._shape(conn, schema) != self.shape:
                return False
            for table, rows in self.rows.items():
                conn.exec_driver_sql(f'DELETE FROM "{schema}"."{table}"')
                for row in rows:
                    marks = ", ".join(["%s"] * len(row))
                    conn.exec_driver_sql(f'INSERT INTO "{schema}"."{table}" VALUES ({marks})', row)
            for sequence in self.sequences:
                conn.exec_driver_sql(f'ALTER SEQUENCE "{schema}"."{sequence}" RESTART')
        return True


@pytest.fixture(scope="session")
def _migrated_schemas():  # noqa: ANN202
    pool = _MigratedSchemas()
    yield pool
    pool.drop_all()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store URL for each backend: empty, or on PostgreSQL already migrated when the
    test migrates it anyway (it asks for ``store``)."""
    if request.param == "postgresql" and "store" in request.fixturenames:
        need_service("PostgreSQL", "127.0.0.1", 5432)
        pool: _MigratedSchemas = request.getfixturevalue("_migrated_schemas")
        schema = pool.take()
        request.addfinalizer(lambda: pool.give_back(schema))
        return _schema_url(schema)
    return make_database_url(request.param, tmp_path, request)


def migrate_up_to(conn, version: int) -> None:  # noqa: ANN001
    """Apply the first ``version`` migrations on ``conn``, as a release that stopped there did
    (an upgrade test's starting point)."""
    import time as _time

    from keys.store.schema import MIGRATIONS, schema_table

    schema_table.create(conn)
    for number, _what, apply in MIGRATIONS[:version]:
        apply(conn)
        conn.execute(schema_table.insert().values(version=number, applied_at=_time.time()))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty SQLite store, copied for each test (migrating a new file each time
    cost ~13 ms a test)."""
    from keys import open_store

    path = tmp_path_factory.mktemp("template") / "keygate.db"
    s = open_store(f"sqlite:///{path}")
    s.migrate()
    s.close()
    return path


@pytest.fixture
def store(store_url: str, request: pytest.FixtureRequest):  # noqa: ANN201
    """An initialised, empty store on every backend: memory, SQLite, PostgreSQL."""
    import shutil

    from keys import open_store

    if store_url.startswith("sqlite:///"):
        target = Path(store_url.removeprefix("sqlite:///"))
        if not target.exists():
            shutil.copyfile(request.getfixturevalue("_sqlite_template"), target)
            target.chmod(0o600)
    s = open_store(store_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def env(tmp_path: Path, secret_key: str) -> dict[str, str]:
    """Environment for a CLI or server subprocess with its own instance dir and store."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    e.update(
        KEYGATE_INSTANCE_PATH=str(tmp_path / "instance"),
        KEYGATE_DATABASE_URL=f"sqlite:///{tmp_path / 'instance' / 'keygate.db'}",
        KEYGATE_SECRET_KEY=secret_key,
        PYTHONUNBUFFERED="1",
    )
    return e


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, secret_key: str) -> None:
    """In-process code never touches the repo's instance/ or a developer's .env values."""
    for name in list(os.environ):
        if name.startswith("KEYGATE_") and name != "KEYGATE_REQUIRE_SERVICES":
            monkeypatch.delenv(name)
    monkeypatch.setenv("KEYGATE_INSTANCE_PATH", str(tmp_path / "instance"))
    monkeypatch.setenv("KEYGATE_SECRET_KEY", secret_key)


def run_cli(env: dict[str, str], *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python manage.py ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env, cwd=ROOT, capture_output=True, text=True, input=input, timeout=timeout,
    )


def invoke_cli(env: dict[str, str], *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """``manage.py ARGS`` in this process with click's ``CliRunner``: ``run_cli``'s answer
    (exit status, stdout, stderr) without starting an interpreter, which costs about a second
    of CPU each. The environment's ``KEYGATE_*`` variables are ``env``'s. An exception that
    escapes the CLI fails the test: a user would have seen a traceback."""
    from click.testing import CliRunner

    from api.cli import cli

    variables: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KEYGATE_")}
    variables.update({k: v for k, v in env.items() if k.startswith("KEYGATE_")})
    result = CliRunner(env=variables).invoke(cli, list(args), input=input, prog_name="manage.py")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"manage.py {' '.join(args)} raised {result.exception!r}") from result.exception
    return subprocess.CompletedProcess(["manage.py", *args], result.exit_code, result.stdout, result.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``manage.py serve`` process; its whole output is kept for inspection.

    ``args`` go to ``serve`` after ``--port`` and ``--workers``; ``verify`` is the CA bundle
    of an HTTPS server (its ``url`` is then ``https://``)."""

    def __init__(self, env: dict[str, str], workers: int = 1, log_path: Path | None = None,
                 args: tuple[str, ...] = (), verify: str | None = None) -> None:
        self.env = env
        self.port = free_port()
        self.verify: str | bool = verify or True
        self.url = f"{'https' if verify else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(env["KEYGATE_INSTANCE_PATH"]).parent / f"server-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(self.port),
             "--workers", str(workers), *args],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.output()}")

    def get(self, path: str, **kw):  # noqa: ANN201
        return requests.get(self.url + path, timeout=10, verify=self.verify, **kw)

    def request(self, method: str, path: str, **kw):  # noqa: ANN201
        return requests.request(method, self.url + path, timeout=10, verify=self.verify, **kw)

    def output(self) -> str:
        if self.proc.poll() is None:  # the access log is written out in batches: wait for the last one
            from api.accesslog import ACCESS_LOG_INTERVAL

            # A request's record waits up to half the interval, its line up to the interval.
            time.sleep(ACCESS_LOG_INTERVAL * 1.5 + 0.15)
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        took = 0.0
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            took = time.monotonic() - started
        if not self._log.closed:
            self._log.close()
            # Every server of the suite, whatever its test did: nothing it printed may hold
            # a key or a token (the access log redacts them; nothing else may print them).
            output = self.output()
            assert_no_credentials(output, f"output of the server on port {self.port}")
            # A stop takes well under a second; a worker that ignores it is killed once the
            # 15 s grace period is over. (granian's "refused to gracefully stop" is no sign:
            # it also says so of a worker caught exiting, 1 ms after its last descriptor closed.)
            assert took < 12, f"the server took {took:.1f} s to stop: a worker ignored it\n{output[-3000:]}"


@pytest.fixture
def start_server(env: dict[str, str]):
    """Factory: ``start_server(workers=1, env_overrides=..., args=..., verify=...)`` → a running
    ``Server``; stopped at teardown."""
    servers: list[Server] = []

    def start(workers: int = 1, env_overrides: dict[str, str] | None = None,
              args: tuple[str, ...] = (), verify: str | None = None) -> Server:
        e = dict(env)
        e.update(env_overrides or {})
        s = Server(e, workers=workers, args=args, verify=verify)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def wait_for_workers(server: Server, n: int, timeout: float = 30) -> list[int]:
    """Until ``n`` of ``server``'s workers have loaded the app (Linux: each maps the
    embedded rate-limit table, which create_app opens), so requests can reach every one.
    ``/healthz`` answering only proves that the first worker is up."""
    deadline = time.monotonic() + timeout
    while True:
        loaded = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == server.proc.pid and "/ratelimits-" in Path(f"/proc/{pid}/maps").read_text():
                    loaded.append(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        if len(loaded) >= n:
            return loaded
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(loaded)} of {n} workers loaded the app:\n{server.output()}")
        time.sleep(0.05)


@pytest.fixture
def make_app(tmp_path: Path):  # noqa: ANN201
    """``make_app(store, **config)``: an app over ``store``, each with its own instance dir;
    its usage counters are flushed and its rate-limit table closed at teardown."""
    from api import create_app

    apps = []

    def make(store, **config):  # noqa: ANN001, ANN202
        cfg = {"DATABASE_URL": "memory://", "INSTANCE_PATH": str(tmp_path / f"app{len(apps)}"), **config}
        app = create_app(cfg, store=store)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["keygate.usage"].close()
        app.extensions["keygate.ratelimits"].limiter.close()


@pytest.fixture
def app(store, make_app):  # noqa: ANN001, ANN201
    """The app over ``store`` (every backend ``store`` is parametrized over)."""
    return make_app(store)


@pytest.fixture
def client(app):  # noqa: ANN001, ANN201
    return app.test_client()


@pytest.fixture
def cli_store(env: dict[str, str]):  # noqa: ANN201
    """The (initialised) store the CLI subprocesses of ``env`` use, opened in-process too."""
    from keys import open_store

    s = open_store(env["KEYGATE_DATABASE_URL"])
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def admin(store):  # noqa: ANN001, ANN201
    """An admin key in ``store`` (an ``IssuedKey``: ``.plaintext``, ``.record``)."""
    from keys import issue_key

    return issue_key(store, name="admin", scopes=["admin"])


@pytest.fixture
def A(admin) -> dict[str, str]:  # noqa: ANN001, N802
    """Headers carrying the admin key."""
    return {"API-Key": admin.plaintext}


def iso(text: str) -> float:
    """An ISO 8601 UTC timestamp from the API or CLI → epoch seconds."""
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *, names: str) -> None:
    """A refused CLI call: non-zero, no traceback, one line (click's usage errors too) naming ``names``."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert names in proc.stderr, proc.stderr


def allow_refused_credentials(app, limit: str = "100000/minute") -> None:  # noqa: ANN001
    """Raise the app's per-address limit of refused credentials (``KEYGATE_AUTH_FAILURE_LIMIT``,
    30/minute by default) for a test that sends many bad credentials on purpose."""
    from keys.parse import parse_rate_limit

    app.extensions["keygate.ratelimits"].auth_failure_limit = parse_rate_limit(limit)


def pytest_collection_finish(session: pytest.Session) -> None:
    """What the imports built lives as long as the session: out of the collector's sight, so
    the full collections that the tests' garbage triggers don't walk it again and again."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _close_the_apps_a_test_made(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN202
    """Every app a test builds is closed after it (usage written, threads stopped, files and
    connections closed), as a server closes its app when a worker exits: hundreds of apps left
    open kept two threads each awake for the rest of the session."""
    from api.app import KeygateFlask

    made: list[KeygateFlask] = []
    original = KeygateFlask.__init__

    def init(self: KeygateFlask, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(KeygateFlask, "__init__", init)
    yield
    for app in made:
        close = app.extensions.get("keygate.close")
        if close is not None:
            close()
