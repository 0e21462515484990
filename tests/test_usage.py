"""Usage tracking (issue 4): ``last_used_at`` and ``use_count`` per key, written behind.

A request only bumps a counter in the worker's memory; ``UsageRecorder`` writes the batch
to the store every 5 seconds from a daemon thread, and once more on a clean shutdown
(SIGTERM to ``manage.py serve``: each worker writes its batch as it exits).

What a crash may lose: a worker that dies without a clean shutdown (SIGKILL, OOM kill,
power loss) loses the counts it gathered since its last flush — at most one flush
interval (5 s) of ``use_count`` increments and ``last_used_at`` updates, per worker.
Keys, revocations and audit events are written synchronously and are never at risk; a
store that is briefly unreachable loses nothing either (the batch is kept and retried).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests

from conftest import invoke_cli, wait_for_workers
from keys import issue_key, open_store
from keys.usage import UsageRecorder


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def new_key(store, scopes=("secret:read", "data:read"), **kw):  # noqa: ANN001, ANN201
    issued = issue_key(store, name=kw.pop("name", "client"), scopes=list(scopes), **kw)
    return issued.plaintext, issued.record.id


class CountingWrites:
    """Wraps a store's usage writers and counts the calls: one call is one store write."""

    def __init__(self, store, monkeypatch) -> None:  # noqa: ANN001
        self.calls = 0
        for name in ("record_usage", "add_auth_failures"):
            monkeypatch.setattr(store, name, self._wrap(getattr(store, name)))

    def _wrap(self, fn):  # noqa: ANN001, ANN202
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            return fn(*args, **kwargs)

        return counted


# -- through the API, on every store backend ------------------------------------------


def test_usage_moves_after_use_and_shows_in_the_admin_api(store, make_app):
    app = make_app(store)
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600  # only our explicit flushes write, whatever the machine's speed
    admin, admin_id = new_key(store, scopes=["admin"], name="admin")
    plaintext, key_id = new_key(store)
    client = app.test_client()
    h = {"API-Key": admin}

    fresh = client.get(f"/admin/keys/{key_id}", headers=h).get_json()
    assert fresh["last_used_at"] is None and fresh["use_count"] == 0

    before = int(time.time())
    for _ in range(7):
        assert client.get("/secret", headers={"API-Key": plaintext}).status_code == 200
    after = time.time()
    # Written behind: requests alone did not touch the stored record ...
    assert store.get(key_id).use_count == 0
    usage.flush()  # ... the flusher does (every 5 s, and on shutdown)

    shown = client.get(f"/admin/keys/{key_id}", headers=h).get_json()
    assert shown["use_count"] == 7
    assert before <= parse_time(shown["last_used_at"]) <= after
    listed = {k["id"]: k for k in client.get("/admin/keys", headers=h).get_json()["keys"]}
    assert listed[key_id]["use_count"] == 7
    assert listed[key_id]["last_used_at"] == shown["last_used_at"]

    for _ in range(3):
        assert client.get("/data", headers={"API-Key": plaintext}).status_code == 200
    usage.flush()
    again = client.get(f"/admin/keys/{key_id}", headers=h).get_json()
    assert again["use_count"] == 10
    assert parse_time(again["last_used_at"]) >= parse_time(shown["last_used_at"])
    # The admin key's own requests are usage too (three before the last flush).
    assert store.get(admin_id).use_count == 3


def test_token_requests_are_the_parent_keys_usage(store, make_app):
    app = make_app(store)
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600
    plaintext, key_id = new_key(store, scopes=["data:read"])
    client = app.test_client()
    token = client.post("/tokens", headers={"API-Key": plaintext}).get_json()["token"]
    for _ in range(4):
        assert client.get("/data", query_string={"token": token}).status_code == 200
    usage.flush()
    assert store.get(key_id).use_count == 5


def test_a_request_let_in_that_then_fails_is_not_a_use(store, make_app, monkeypatch):
    """``use_count`` counts successful uses: a request whose key passed but whose answer is a
    400 (its body) or a 503 (the store went away mid-request) is no use. The soak found a mint
    answered 503 during a PostgreSQL cut but counted."""
    from keys import StoreUnavailable

    app = make_app(store)
    usage = app.extensions["keygate.usage"]
    usage.interval = 3600
    plaintext, key_id = new_key(store, scopes=["data:read"])
    client = app.test_client()
    h = {"API-Key": plaintext}
    assert client.post("/tokens", headers=h, json={"ttl": -1}).status_code == 400

    def store_gone(*_a: object, **_k: object) -> None:
        raise StoreUnavailable("the key store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(store, "summarize", store_gone)  # the mint's audit summary: a store write
        assert client.post("/tokens", headers=h).status_code == 503
    assert client.post("/tokens", headers=h).status_code == 201
    usage.flush()
    assert store.get(key_id).use_count == 1
    assert sum(b.accepted for b in store.usage(key_id, 0, time.time() + 3600)) == store.get(key_id).use_count


def test_flushes_from_several_workers_add_up_and_keep_the_latest_time(store):
    """Each worker flushes its own batch, in any order: counts add, ``last_used_at``
    never moves backwards."""
    _, key_id = new_key(store)
    early, late = UsageRecorder(store), UsageRecorder(store)
    for i in range(3):
        late.hit(key_id, now=2_000_000_000.0 + i)
    for i in range(5):
        early.hit(key_id, now=1_900_000_000.0 + i)
    late.flush()
    early.flush()
    record = store.get(key_id)
    assert record.use_count == 8
    assert record.last_used_at == pytest.approx(2_000_000_002.0)
    assert record.metadata()["last_used_at"] == "2033-05-18T03:33:22Z"


# -- the recorder itself -----------------------------------------------------------------


@pytest.fixture
def memory_store():  # noqa: ANN201
    s = open_store("memory://")
    s.migrate()
    yield s
    s.close()


def test_one_write_per_flush_not_per_request(memory_store, monkeypatch):
    writes = CountingWrites(memory_store, monkeypatch)
    usage = UsageRecorder(memory_store, interval=3600)
    keys = [new_key(memory_store, name=f"k{i}")[1] for i in range(3)]
    for n in range(300):
        usage.hit(keys[n % 3], now=1_800_000_000.0 + n)
    usage.failure("invalid_credentials")
    usage.failure("invalid_credentials")
    usage.failure("key_revoked")
    assert writes.calls == 0
    usage.flush()
    assert writes.calls == usage.flushes == 2  # one usage batch, one failure batch
    assert [memory_store.get(k).use_count for k in keys] == [100, 100, 100]
    assert memory_store.get(keys[2]).last_used_at == 1_800_000_299.0
    assert memory_store.auth_failures() == {"invalid_credentials": 2, "key_revoked": 1}
    usage.flush()  # nothing new: nothing written
    assert writes.calls == 2
    usage.close()


def test_a_store_outage_loses_no_counts(memory_store, monkeypatch, caplog):
    _, key_id = new_key(memory_store)
    usage = UsageRecorder(memory_store, interval=3600)
    real = memory_store.record_usage
    down = {"now": True}

    def flaky(batch, *hourly):  # noqa: ANN001, ANN002, ANN202
        if down["now"]:
            raise ConnectionError("store down")
        return real(batch, *hourly)

    monkeypatch.setattr(memory_store, "record_usage", flaky)
    for _ in range(4):
        usage.hit(key_id)
    with caplog.at_level(logging.WARNING, logger="keygate.usage"):
        usage.flush()
    assert "could not write usage counters" in caplog.text
    assert memory_store.get(key_id).use_count == 0
    usage.hit(key_id)
    down["now"] = False
    usage.flush()
    assert memory_store.get(key_id).use_count == 5
    usage.close()


def test_the_background_flusher_writes_without_being_asked(memory_store):
    _, key_id = new_key(memory_store)
    usage = UsageRecorder(memory_store, interval=0.05)
    usage.hit(key_id)
    deadline = time.monotonic() + 10
    while memory_store.get(key_id).use_count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memory_store.get(key_id).use_count == 1
    usage.close()


def test_close_flushes_what_is_left(memory_store):
    _, key_id = new_key(memory_store)
    usage = UsageRecorder(memory_store, interval=3600)
    for _ in range(3):
        usage.hit(key_id)
    usage.close()
    assert memory_store.get(key_id).use_count == 3


def test_close_waits_for_a_flush_under_way(memory_store):
    """The flusher thread had swapped its batch out and was writing it when the worker
    stopped: ``close`` found nothing left, the process exited, and the daemon thread died
    mid-write with the batch (a real server lost one worker's 5 s of counts this way, about
    one stop in six). ``close`` now returns only once that write is done."""
    import threading

    _, key_id = new_key(memory_store)
    writing, release = threading.Event(), threading.Event()
    real = memory_store.record_usage

    def slow_write(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        writing.set()
        release.wait(10)
        return real(*args, **kwargs)

    memory_store.record_usage = slow_write
    usage = UsageRecorder(memory_store, interval=0.05)
    for _ in range(100):
        usage.hit(key_id)
    assert writing.wait(10)  # the flusher holds the 100 and is writing them
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (usage.close(), closed.set()), daemon=True)
    closer.start()
    usage.hit(key_id)  # a request finishing during the shutdown
    assert not closed.wait(0.3)  # close waits for the write under way
    release.set()
    assert closed.wait(10)
    assert memory_store.get(key_id).use_count == 101  # all of it written before close returned


def test_counts_after_close_get_a_new_flusher(memory_store):
    """``close`` stops the flusher; counting again (an app reused after shutdown) starts one."""
    _, key_id = new_key(memory_store)
    usage = UsageRecorder(memory_store, interval=0.05)
    usage.hit(key_id)
    usage.close()
    usage.hit(key_id)
    deadline = time.monotonic() + 10
    while memory_store.get(key_id).use_count < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memory_store.get(key_id).use_count == 2
    usage.close()


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_a_forked_child_counts_only_its_own_requests(memory_store):
    """A child forked from a process that counted (a pre-forking server) starts with no
    pending counts (the parent writes those) and a flusher of its own."""
    _, key_id = new_key(memory_store)
    usage = UsageRecorder(memory_store, interval=3600)
    usage.hit(key_id)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, never return into pytest
        try:
            fresh = usage.pending_usage() == {} and usage._thread is None
            usage.hit(key_id)
            counted = usage.pending_usage().get(key_id) == 1 and usage._thread is not None
            os.write(write, b"ok" if fresh and counted else b"bad")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 10) == b"ok"
    os.waitpid(pid, 0)
    os.close(read)
    assert usage.pending_usage() == {key_id: 1}  # the parent's count is still the parent's
    usage.close()
    assert memory_store.get(key_id).use_count == 1


# -- 10,000 requests, few writes ------------------------------------------------------------


def test_ten_thousand_requests_cost_at_most_one_percent_in_store_writes(tmp_path, make_app, monkeypatch):
    """10,000 authorised requests through the app, with the flush interval at its default
    (5 s): the store sees at most 100 usage writes (in practice one or two), and after the
    final flush the count is exact.

    A crash in the middle would lose at most the counts since the last flush (one interval);
    a clean shutdown loses nothing.
    """
    store = open_store(f"sqlite:///{tmp_path / 'keygate.db'}")
    store.migrate()
    plaintext, key_id = new_key(store, rate_limit="10000/minute")
    writes = CountingWrites(store, monkeypatch)
    app = make_app(store)
    usage = app.extensions["keygate.usage"]
    assert usage.interval == 5.0
    client = app.test_client()
    environ = {"HTTP_API_KEY": plaintext}
    for _ in range(10_000):
        resp = client.get("/secret", environ_base=environ)
        assert resp.status_code == 200
    usage.flush()
    assert writes.calls <= 100
    assert usage.flushes == writes.calls
    assert store.get(key_id).use_count == 10_000
    store.close()


# -- the CLI, in-process app ----------------------------------------------------------------


def test_usage_shows_in_show_key_and_list_keys(env, make_app):
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    created = json.loads(invoke_cli(env, "create-key", "--name", "c", "--scope", "secret:read", "--json").stdout)
    idle = json.loads(invoke_cli(env, "create-key", "--name", "idle", "--scope", "secret:read", "--json").stdout)
    shown = json.loads(invoke_cli(env, "show-key", created["id"], "--json").stdout)
    assert shown["use_count"] == 0 and shown["last_used_at"] is None

    store = open_store(env["KEYGATE_DATABASE_URL"])
    app = make_app(store, INSTANCE_PATH=env["KEYGATE_INSTANCE_PATH"])
    before = int(time.time())
    client = app.test_client()
    for _ in range(6):
        assert client.get("/secret", headers={"API-Key": created["key"]}).status_code == 200
    app.extensions["keygate.usage"].close()  # a clean shutdown
    store.close()

    shown = json.loads(invoke_cli(env, "show-key", created["id"], "--json").stdout)
    assert shown["use_count"] == 6
    assert before <= parse_time(shown["last_used_at"]) <= time.time()
    listed = {k["id"]: k for k in json.loads(invoke_cli(env, "list-keys", "--json").stdout)}
    assert listed[created["id"]]["use_count"] == 6
    assert listed[idle["id"]]["use_count"] == 0 and listed[idle["id"]]["last_used_at"] is None


# -- a real server: clean shutdown flushes every worker ------------------------------------


@pytest.mark.slow
def test_a_clean_shutdown_flushes_every_worker(env, start_server):
    """SIGTERM → the server stops its workers → each worker writes its batch as it exits, so the
    count is exact even though the 5 s interval never elapsed."""
    admin = json.loads(invoke_cli(env, "init", "--json").stdout)["admin_key"]
    created = json.loads(invoke_cli(env, "create-key", "--name", "c", "--scope", "secret:read", "--json").stdout)
    server = start_server(workers=2)
    wait_for_workers(server, 2)
    before = int(time.time())

    def one(_: int) -> int:
        with requests.Session() as s:
            return s.get(server.url + "/secret", timeout=10,
                         headers={"API-Key": created["key"], "Connection": "close"}).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(30))) == [200] * 30
    server.stop()
    assert server.proc.returncode == 0
    assert "could not write usage counters" not in server.log_path.read_text()

    shown = json.loads(invoke_cli(env, "show-key", created["id"], "--json").stdout)
    assert shown["use_count"] == 30
    assert before <= parse_time(shown["last_used_at"]) <= time.time()
    listed = {k["id"]: k for k in json.loads(invoke_cli(env, "list-keys", "--json").stdout)}
    assert listed[created["id"]]["use_count"] == 30

    # ... and through the API of the next server.
    again = start_server(workers=1)
    via_api = again.get(f"/admin/keys/{created['id']}", headers={"API-Key": admin["key"]}).json()
    assert via_api["use_count"] == 30
    assert via_api["last_used_at"] == shown["last_used_at"]
