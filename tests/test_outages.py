"""What a PostgreSQL outage does to a serving instance: 503s, never 500s, and never a
key accepted past the cache's staleness bound; service resumes by itself.

The database is reached through a small TCP proxy that the test can cut, so the
real PostgreSQL (shared with other tests) is never stopped.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from api import create_app
from conftest import make_database_url
from keys import issue_key, open_store


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the real PostgreSQL until ``cut()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.flowing = threading.Event()  # cleared: a hung database (nothing answers, nothing closes)
        self.flowing.set()
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
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self.flowing.wait()  # hung: held, neither delivered nor refused
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

    def restore(self) -> None:
        self.up = True

    def hang(self) -> None:
        """Connections stay open and accept bytes, but nothing gets through either way."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.flowing.set()
        self.cut()
        self.listener.close()


@pytest.fixture
def proxied_pg(request: pytest.FixtureRequest, tmp_path: Path):
    url = make_database_url("postgresql", tmp_path, request)
    proxy = TcpProxy(("127.0.0.1", 5432))
    yield url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), proxy
    proxy.close()


def test_a_killed_connection_is_replaced_transparently(proxied_pg, tmp_path: Path) -> None:
    url, proxy = proxied_pg
    store = open_store(url)
    store.migrate()
    key = issue_key(store, name="k", scopes=["secret:read"])
    app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path)})
    client = app.test_client()
    assert client.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200
    proxy.cut()  # every open connection dies (a database restart, an idle timeout) ...
    proxy.restore()  # ... and the database is back at once
    time.sleep(0.6)  # past the cache's staleness bound: the next request must ask the store
    assert client.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200
    app.extensions["keygate.usage"].close()
    store.close()


def test_an_outage_is_503_never_500_and_never_a_stale_yes(proxied_pg, tmp_path: Path) -> None:
    url, proxy = proxied_pg
    store = open_store(url)
    store.migrate()
    cached = issue_key(store, name="cached", scopes=["secret:read"])
    unseen = issue_key(store, name="unseen", scopes=["secret:read"])
    admin = issue_key(store, name="admin", scopes=["admin"])
    app = create_app({"DATABASE_URL": url, "INSTANCE_PATH": str(tmp_path)})
    client = app.test_client()
    assert client.get("/secret", headers={"API-Key": cached.plaintext}).status_code == 200
    assert client.get("/admin/keys", headers={"API-Key": admin.plaintext}).status_code == 200

    proxy.cut()
    time.sleep(0.6)
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
                    "INSTANCE_PATH": str(tmp_path), "SECRET_KEY": secrets.token_urlsafe(40)})
    assert "unreachable" in str(info.value) or "unavailable" in str(info.value)
