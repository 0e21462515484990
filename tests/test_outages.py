"""What a PostgreSQL outage does to a serving instance: 503s, never 500s, and never a
key accepted past the cache's staleness bound; service resumes by itself.

The database is reached through a small TCP proxy that the test can cut, so the
real PostgreSQL (shared with other tests) is never stopped.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import keys.cache
from api import create_app
from conftest import make_database_url, strong_secret
from keys import issue_key, open_store


def past_the_staleness_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's clock (``time.monotonic`` in keys/cache.py) a second ahead, past its 0.5 s
    bound: the next request must ask the store, without the test sleeping for it."""
    real = time.monotonic
    monkeypatch.setattr(keys.cache, "time", SimpleNamespace(monotonic=lambda: real() + 1))


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the real PostgreSQL until ``cut()`` (connections refused
    and reset, as when the database is down) or ``hang()`` (connections accepted, bytes taken
    and never answered, as from a hung server or a firewall that drops silently)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.hanging = False
        self.conns: list[socket.socket] = []
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
            if self.hanging:  # the TCP handshake succeeds; nothing ever comes back
                self.conns.append(client)
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.hanging:  # hanging: taken (the kernel acknowledges it) and dropped
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns.clear()

    def hang(self) -> None:
        self.hanging = True

    def restore(self) -> None:
        """Up again; connections open during a hang have lost bytes, so they are reset."""
        if self.hanging:
            self.hanging = False
            self.cut()
        self.up = True

    resume = restore

    def close(self) -> None:
        self.hanging = False
        self.cut()
        self.listener.close()


def app_behind_the_proxy(url: str, tmp_path: Path):  # noqa: ANN201
    """(store, app, client, cached, unseen, admin): a migrated store behind the proxy, an app
    on it, and three keys — one the tests use before the outage (so cached), one they don't,
    and an admin key."""
    store = open_store(url)
    store.migrate()
    cached = issue_key(store, name="cached", scopes=["secret:read"])
    unseen = issue_key(store, name="unseen", scopes=["secret:read"])
    admin = issue_key(store, name="admin", scopes=["admin"])
    app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path)})
    return store, app, app.test_client(), cached, unseen, admin


@pytest.fixture
def proxied_pg(request: pytest.FixtureRequest, tmp_path: Path):
    url = make_database_url("postgresql", tmp_path, request)
    proxy = TcpProxy(("127.0.0.1", 5432))
    yield url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), proxy
    proxy.close()


def test_a_killed_connection_is_replaced_transparently(proxied_pg, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, proxy = proxied_pg
    store = open_store(url)
    store.migrate()
    key = issue_key(store, name="k", scopes=["secret:read"])
    app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path)})
    client = app.test_client()
    assert client.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200
    proxy.cut()  # every open connection dies (a database restart, an idle timeout) ...
    proxy.restore()  # ... and the database is back at once
    past_the_staleness_bound(monkeypatch)
    assert client.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200
    app.extensions["keygate.usage"].close()
    store.close()


def test_an_outage_is_503_never_500_and_never_a_stale_yes(proxied_pg, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, proxy = proxied_pg
    store, app, client, cached, unseen, admin = app_behind_the_proxy(url, tmp_path)
    assert client.get("/secret", headers={"API-Key": cached.plaintext}).status_code == 200
    assert client.get("/admin/keys", headers={"API-Key": admin.plaintext}).status_code == 200

    proxy.cut()
    past_the_staleness_bound(monkeypatch)
    for key in (cached, unseen):
        r = client.get("/secret", headers={"API-Key": key.plaintext})
        assert r.status_code == 503, r.text
        assert r.headers["Content-Type"] == "application/problem+json"
        assert r.json["code"] == "store_unavailable"
        assert r.headers["Retry-After"] == "5"  # a hint, so clients back off instead of hammering
    # Management calls too (the admin key is cached, the listing is not); junk is still a
    # plain 401, decided before any store access; and the health probe still answers.
    r = client.get("/admin/keys", headers={"API-Key": admin.plaintext})
    assert r.status_code == 503 and r.json["code"] == "store_unavailable"
    assert client.get("/secret", headers={"API-Key": "kg_" + "x" * 50}).status_code == 401
    assert client.get("/healthz").status_code == 200

    proxy.restore()
    assert client.get("/secret", headers={"API-Key": cached.plaintext}).status_code == 200
    assert client.get("/secret", headers={"API-Key": unseen.plaintext}).status_code == 200
    app.extensions["keygate.usage"].close()
    store.close()


def test_a_database_that_is_down_at_start_is_one_clear_error(tmp_path: Path) -> None:
    from keys.exc import StoreUnavailable

    port = socket.create_server(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    with pytest.raises(StoreUnavailable) as info:
        create_app({"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed}/test",
                    "INSTANCE_PATH": str(tmp_path), "SECRET_KEY": strong_secret()})
    assert "unreachable" in str(info.value) or "unavailable" in str(info.value)


# -- issue 12: a database that stops answering (not one that refuses) ---------------------------


def timed(call, limit: float = 5.0):  # noqa: ANN001, ANN201
    """``call()`` on a thread: (its result, seconds); fails instead of hanging past ``limit``."""
    box: list = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: box.append(call()), daemon=True)
    worker.start()
    worker.join(limit)
    assert box, f"no answer within {limit} s: a request hangs"
    return box[0], time.monotonic() - started


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_a_database_that_stops_answering_gets_503_within_2_s_and_recovery_needs_no_restart(proxied_pg, tmp_path):
    url, proxy = proxied_pg
    store, app, client, cached, unseen, admin = app_behind_the_proxy(url, tmp_path)
    A = {"API-Key": admin.plaintext}
    assert client.get("/secret", headers={"API-Key": cached.plaintext}).status_code == 200
    assert client.get("/admin/keys", headers=A).status_code == 200

    proxy.hang()  # every byte is taken and acknowledged; no answer ever comes back
    time.sleep(0.6)  # past the cache's staleness bound: requests need the database
    calls = {
        "cached key": lambda: client.get("/secret", headers={"API-Key": cached.plaintext}),
        "unseen key": lambda: client.get("/secret", headers={"API-Key": unseen.plaintext}),
        "list keys": lambda: client.get("/admin/keys", headers=A),
        "create key": lambda: client.post("/admin/keys", headers=A, json={"name": "n", "scopes": ["admin"]}),
        "mint token": lambda: client.post("/tokens", headers=A),
        "revoke": lambda: client.delete(f"/admin/keys/{unseen.record.id}", headers=A),
    }
    for _round in range(2):  # the second round, after the cool-down, asks the database again
        for what, call in calls.items():
            resp, seconds = timed(call)
            assert seconds < 2.0, f"{what}: answered after {seconds:.2f} s"
            assert resp.status_code == 503, (what, resp.get_data(as_text=True))
            body = resp.get_json(force=True)
            assert body["code"] == "store_unavailable" and resp.headers["Retry-After"] == "5"
            assert body["detail"] == "the key store is unavailable; try again shortly"  # no cause
        health, seconds = timed(lambda: client.get("/healthz"))
        assert health.status_code == 200 and seconds < 0.5
        time.sleep(1.2)

    proxy.restore()
    deadline = time.monotonic() + 5
    while client.get("/secret", headers={"API-Key": cached.plaintext}).status_code != 200:
        assert time.monotonic() < deadline, "no recovery without a restart"
        time.sleep(0.2)
    assert client.get("/secret", headers={"API-Key": unseen.plaintext}).status_code == 200
    assert client.post("/admin/keys", headers=A, json={"name": "n", "scopes": ["admin"]}).status_code == 201
    app.extensions["keygate.close"]()


def test_a_503_tells_the_client_nothing_of_the_cause_and_the_log_everything(proxied_pg, tmp_path, caplog):
    url, proxy = proxied_pg
    store = open_store(url)
    store.migrate()
    admin = issue_key(store, name="admin", scopes=["admin"])
    app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path)})
    client = app.test_client()
    assert client.get("/admin/keys", headers={"API-Key": admin.plaintext}).status_code == 200
    proxy.cut()
    resp = client.post("/tokens", headers={"API-Key": admin.plaintext})
    assert resp.status_code == 503
    text = resp.get_data(as_text=True)
    assert str(proxy.port) not in text and "127.0.0.1" not in text and "server" not in text
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "keygate.store")
    assert "key store unavailable" in logged and str(proxy.port) in logged
    app.extensions["keygate.close"]()
    store.close()


def test_a_read_only_database_is_503_and_no_hash_reaches_a_log(tmp_path, request, caplog):
    """A failover to a standby: reads work, writes are refused; never a 500 with a parameter dump."""
    import re

    url = make_database_url("postgresql", tmp_path, request)
    store = open_store(url)
    store.migrate()
    admin = issue_key(store, name="admin", scopes=["admin"])
    store.close()
    read_only = url + "%20-cdefault_transaction_read_only%3Don"
    app = create_app({"DATABASE_URL": read_only, "INSTANCE_PATH": str(tmp_path)})
    client = app.test_client()
    A = {"API-Key": admin.plaintext}
    assert client.get("/admin/keys", headers=A).status_code == 200  # reads are fine
    for resp in (client.post("/admin/keys", headers=A, json={"name": "n", "scopes": ["admin"]}),
                 client.post("/tokens", headers=A),
                 client.post(f"/admin/keys/{admin.record.id}/rotate", headers=A)):
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert resp.get_json()["code"] == "store_unavailable" and resp.headers["Retry-After"] == "5"
    app.extensions["keygate.usage"].flush()  # usage writes are refused too, and logged
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "ReadOnlySqlTransaction" in logged
    assert not re.search(r"[0-9a-f]{64}", logged), "a hash reached the log"
    assert admin.record.key_hash not in logged
    app.extensions["keygate.close"]()


def test_postgres_connections_carry_their_bounds(tmp_path, request):
    """libpq's connect_timeout and keepalives, and a server-side statement timeout added to the
    URL's own options (the test URL sets search_path there, which still applies)."""
    import sqlalchemy as sa

    url = make_database_url("postgresql", tmp_path, request)
    store = open_store(url)
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "5s"
        assert conn.execute(sa.text("SHOW search_path")).scalar().startswith("kg_test_")
        params = conn.connection.driver_connection.info.get_parameters()
        assert params["connect_timeout"] == "2" and params["keepalives"] == "1"
    store.close()


@pytest.mark.slow
def test_a_hung_database_never_hangs_a_real_server(proxied_pg, env, start_server):
    """One worker, more clients than it has threads: every one is answered within 2 s, and
    so is the health probe, while the database takes bytes and never answers."""
    import requests

    from concurrent.futures import ThreadPoolExecutor

    url, proxy = proxied_pg
    store = open_store(url)
    store.migrate()
    keys = [issue_key(store, name=f"k{i}", scopes=["secret:read"]) for i in range(4)]
    admin = issue_key(store, name="admin", scopes=["admin"])
    store.close()
    server = start_server(workers=1, env_overrides={"KEYGATE_DATABASE_URL": url})
    for key in keys:
        assert server.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200

    proxy.hang()
    time.sleep(0.6)

    def call(i: int) -> tuple[int, float]:
        started = time.monotonic()
        if i % 4 == 3:
            resp = requests.post(server.url + "/admin/keys", headers={"API-Key": admin.plaintext},
                                 json={"name": "n", "scopes": ["admin"]}, timeout=10)
        elif i % 4 == 2:
            resp = requests.get(server.url + "/healthz", timeout=10)
        else:
            resp = requests.get(server.url + "/secret", headers={"API-Key": keys[i % 4].plaintext}, timeout=10)
        return resp.status_code, time.monotonic() - started

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(36)))
    slowest = max(seconds for _, seconds in results)
    assert slowest < 2.0, f"slowest answer {slowest:.2f} s: {results}"
    assert {status for status, _ in results} == {200, 503}, results  # health 200, the rest 503

    proxy.restore()
    deadline = time.monotonic() + 10
    while server.get("/secret", headers={"API-Key": keys[0].plaintext}).status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover"
        time.sleep(0.2)
