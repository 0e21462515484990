"""The access log middleware as a WSGI app sees it: every request gets exactly one record,
in order, stamped with the request's own time, however requests and threads interleave."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from api.accesslog import AccessLog, flush_access_logs


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logged(request: pytest.FixtureRequest) -> tuple[logging.Logger, Records]:
    logger = logging.getLogger(f"test.access.{request.node.name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = Records()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def call(wsgi: AccessLog, path: str, query: str = "", **environ: str) -> list[bytes]:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", **environ}
    return wsgi(env, lambda status, headers, exc_info=None: None)


def test_records_are_written_in_runs_in_order_with_each_requests_time(logged) -> None:
    logger, handler = logged
    wsgi = AccessLog(app, logger, interval=60)  # only a full run (or a flush) writes
    before = time.time()
    for n in range(AccessLog.BATCH - 1):
        assert call(wsgi, f"/r{n}") == [b"ok"]
    assert handler.records == []  # noted, not yet written
    time.sleep(0.05)
    last = time.time()
    call(wsgi, "/last")  # the run is full: this request writes it
    paths = [r.access["path"] for r in handler.records]
    assert paths == [f"/r{n}" for n in range(AccessLog.BATCH - 1)] + ["/last"]
    assert all(before <= r.created < last for r in handler.records[:-1])
    assert handler.records[-1].created >= last  # its request's time, not the run's
    assert handler.records[0].access["status"] == 200 and handler.records[0].access["bytes"] == 2


def test_a_quiet_spell_and_a_worker_exit_write_what_is_noted(logged) -> None:
    logger, handler = logged
    wsgi = AccessLog(app, logger, interval=0.2)
    call(wsgi, "/quiet")
    deadline = time.monotonic() + 2
    while not handler.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.access["path"] for r in handler.records] == ["/quiet"]  # within the interval, no traffic needed
    exiting = AccessLog(app, logger, interval=60)
    call(exiting, "/at-exit")
    flush_access_logs()
    assert [r.access["path"] for r in handler.records] == ["/quiet", "/at-exit"]


def test_threads_lose_no_request_and_log_none_twice(logged) -> None:
    logger, handler = logged
    wsgi = AccessLog(app, logger, interval=0.01)
    threads, per_thread = 8, 500

    def serve(t: int) -> None:
        for n in range(per_thread):
            call(wsgi, f"/t{t}/{n}")

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flush_access_logs()
    paths = [r.access["path"] for r in handler.records]
    assert sorted(paths) == sorted(f"/t{t}/{n}" for t in range(threads) for n in range(per_thread))
    for t in range(threads):  # each thread's requests keep their order
        mine = [p for p in paths if p.startswith(f"/t{t}/")]
        assert mine == [f"/t{t}/{n}" for n in range(per_thread)]


def test_credentials_are_redacted_before_a_record_exists(logged) -> None:
    logger, handler = logged
    wsgi = AccessLog(app, logger, interval=60)
    key = "kg_" + "A" * 40
    call(wsgi, "/data", query="%74oken=abc.def.ghi&x=1", HTTP_USER_AGENT=f"curl {key}", HTTP_REFERER=f"https://x/?k={key}")
    flush_access_logs()
    (record,) = handler.records
    text = repr(record.__dict__)
    assert "abc.def.ghi" not in text and key not in text
    assert "[REDACTED]" in record.access["path"]


def test_a_record_that_cannot_be_built_costs_neither_the_response_nor_the_others(logged, monkeypatch, caplog) -> None:
    logger, handler = logged
    wsgi = AccessLog(app, logger, interval=60)
    real = AccessLog.fields

    def fields(*args: Any) -> dict[str, Any]:
        if args[4] == "/bad":
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(AccessLog, "fields", staticmethod(fields))
    assert call(wsgi, "/before") == [b"ok"]
    assert call(wsgi, "/bad") == [b"ok"]
    assert call(wsgi, "/after") == [b"ok"]
    with caplog.at_level(logging.ERROR, logger="keygate"):
        flush_access_logs()
    assert [r.access["path"] for r in handler.records] == ["/before", "/after"]
    assert "could not be written" in caplog.text


def test_a_stalled_log_holds_requests_back_instead_of_piling_them_up(logged) -> None:
    """A handler stuck on a full stdout: the other threads note at most MAX_PENDING requests,
    then wait for it, as they did when each wrote its own line; nothing is lost."""
    logger, handler = logged
    release = threading.Event()
    stuck = threading.Event()

    class Stalled(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stuck.set()
            release.wait(10)

    stalled = Stalled()
    logger.addHandler(stalled)
    wsgi = AccessLog(app, logger, interval=60)
    threads, per_thread, most = 4, AccessLog.MAX_PENDING, 0

    def serve(t: int) -> None:
        for n in range(per_thread):
            call(wsgi, f"/t{t}/{n}")

    workers = [threading.Thread(target=serve, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    assert stuck.wait(10)
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline:
        most = max(most, len(wsgi._pending))
        time.sleep(0.005)
    assert most <= AccessLog.MAX_PENDING + threads
    assert any(w.is_alive() for w in workers)  # held back, not piling up
    release.set()
    for w in workers:
        w.join(20)
    logger.removeHandler(stalled)
    flush_access_logs()
    assert len(handler.records) == threads * per_thread


def test_a_dropped_access_log_and_handler_take_their_writer_threads_with_them(logged) -> None:
    import gc
    import io
    import weakref

    from api.accesslog import BatchedStreamHandler

    logger, _ = logged
    before = set(threading.enumerate())
    wsgi = AccessLog(app, logger, interval=0.02)
    handler = BatchedStreamHandler(io.StringIO(), interval=0.2)
    logger.addHandler(handler)
    call(wsgi, "/")  # starts the access log's quiet-spell writer
    logger.info("one")
    logger.info("two")  # within the handler's interval: starts its writer
    writers = set(threading.enumerate()) - before
    assert {t.name for t in writers} == {"access-records", "access-log"}
    logger.removeHandler(handler)
    refs = weakref.ref(wsgi), weakref.ref(handler)
    del wsgi, handler
    gc.collect()
    assert [r() for r in refs] == [None, None]  # the fork hooks and the threads held them weakly
    deadline = time.monotonic() + 2
    while any(t.is_alive() for t in writers):
        assert time.monotonic() < deadline, "a writer thread outlived its object"
        time.sleep(0.02)
