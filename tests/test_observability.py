"""Request ids, /metrics, /readyz and outage logging, through the app (Flask test client).

Real servers (several workers, JSON logs, proxies) are in test_operations_server.py.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from keys import issue_key, revoke_key
from keys.exc import StoreUnavailable
from keys.issuing import rotate_key
from keys.ratelimit import RateLimitUnavailable

GENERATED_ID = re.compile(r"[0-9a-f]{32}")
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A Prometheus text exposition as {(name, labels): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
        out[(m["name"], labels)] = float(m["value"])
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def mem(make_app):  # noqa: ANN001, ANN201
    from keys import MemoryKeyStore

    store = MemoryKeyStore()
    app = make_app(store)
    app.testing = True
    return store, app, app.test_client()


def scrape(client, key: str) -> str:  # noqa: ANN001
    resp = client.get("/metrics", headers={"API-Key": key})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return resp.get_data(as_text=True)


# -- request ids ---------------------------------------------------------------------------


def test_every_response_carries_a_request_id(mem) -> None:  # noqa: ANN001
    store, _, client = mem
    key = issue_key(store, name="k", scopes=["secret:read"]).plaintext
    seen = set()
    for method, path, headers in [("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/docs", {}),
                                  ("GET", "/secret", {"API-Key": key}), ("GET", "/secret", {}),
                                  ("GET", "/nope", {}), ("POST", "/secret", {}), ("GET", "/", {})]:
        resp = client.open(path, method=method, headers=headers)
        rid = resp.headers["X-Request-ID"]
        assert GENERATED_ID.fullmatch(rid), (path, rid)
        seen.add(rid)
        if resp.mimetype == "application/problem+json":
            assert resp.get_json(force=True)["request_id"] == rid
    assert len(seen) == 8, "a new id for every request"


@pytest.mark.parametrize("incoming", ["abc", "req-2026.12.02_0001", "A" * 128, "0"])
def test_a_safe_incoming_request_id_is_kept(mem, incoming: str) -> None:  # noqa: ANN001
    resp = mem[2].get("/secret", headers={"X-Request-ID": incoming})
    assert resp.headers["X-Request-ID"] == incoming
    assert resp.get_json(force=True)["request_id"] == incoming


@pytest.mark.parametrize("incoming", ["", "A" * 129, "a b", "a/b", "a\tb", "id;drop", "é", "a\\x", '"x"',
                                      "kg_" + "x" * 200, "<script>"])
def test_any_other_incoming_request_id_is_replaced(mem, incoming: str) -> None:  # noqa: ANN001
    resp = mem[2].get("/secret", environ_overrides={"HTTP_X_REQUEST_ID": incoming})
    rid = resp.headers["X-Request-ID"]
    assert GENERATED_ID.fullmatch(rid) and rid != incoming
    assert resp.get_json(force=True)["request_id"] == rid


# -- /metrics --------------------------------------------------------------------------------


def test_metrics_needs_the_metrics_read_scope(mem) -> None:  # noqa: ANN001
    store, _, client = mem
    reader = issue_key(store, name="prom", scopes=["metrics:read"]).plaintext
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    other = issue_key(store, name="app", scopes=["secret:read", "data:read"]).plaintext
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"API-Key": other}).get_json(force=True)["code"] == "insufficient_scope"
    token = client.post("/tokens", headers={"API-Key": reader}).get_json()["token"]
    assert client.get(f"/metrics?token={token}").status_code == 403  # header only
    scrape(client, reader)
    scrape(client, admin)
    assert client.get("/secret", headers={"API-Key": reader}).status_code == 403  # opens /metrics only


def test_requests_are_counted_exactly_by_route_template(mem) -> None:  # noqa: ANN001
    store, _, client = mem
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    key = issue_key(store, name="k", scopes=["secret:read"])
    for _ in range(7):
        assert client.get("/secret", headers={"API-Key": key.plaintext}).status_code == 200
    for _ in range(3):
        client.get("/secret")
    for i in range(5):  # five different ids: one series, the template
        client.get(f"/admin/keys/{key.record.id if i == 0 else 'A' * 11 + str(i)}", headers={"API-Key": admin})
    client.open("/secret", method="BREW")
    client.open("/secret", method="PROPFIND")
    text = scrape(client, admin)
    assert value(text, "keygate_requests_total", route="/secret", method="GET", status="200") == 7
    assert value(text, "keygate_requests_total", route="/secret", method="GET", status="401") == 3
    assert value(text, "keygate_requests_total", route="/admin/keys/<string:key_id>", method="GET",
                 status="200") == 1
    assert value(text, "keygate_requests_total", route="/admin/keys/<string:key_id>", method="GET",
                 status="404") == 4
    assert value(text, "keygate_requests_total", route="unmatched", method="other", status="405") == 2
    assert value(text, "keygate_request_duration_seconds_count", route="/secret") == 10
    assert value(text, "keygate_request_duration_seconds_bucket", route="/secret", le="+Inf") == 10
    assert value(text, "keygate_auth_refusals_total", code="missing_credentials") == 3
    # No label value is a key, a key id a client sent, or an address.
    for name, labels in samples(text):
        for _, v in labels:
            assert "kg_" not in v and "AAAAAAAAAAA" not in v and "127.0.0.1" not in v and key.record.id not in v


def test_random_paths_do_not_grow_the_series(mem) -> None:  # noqa: ANN001
    store, _, client = mem
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    for i in range(10):
        client.get(f"/x{i}")
    scrape(client, admin)  # the scrape's own series exist from now on
    before = len(samples(scrape(client, admin)))
    for i in range(300):
        client.get(f"/{i}/{'%2e' * (i % 5)}/../z{time.time_ns()}?q={i}")
    after = samples(scrape(client, admin))
    assert len(after) == before
    assert after[("keygate_requests_total", frozenset({("route", "unmatched"), ("method", "GET"),
                                                        ("status", "404")}))] == 310


def test_refusals_and_rate_limits_are_counted_by_code_and_kind(mem) -> None:  # noqa: ANN001
    store, _, client = mem
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    limited = issue_key(store, name="k", scopes=["secret:read"], rate_limit="2/minute").plaintext
    revoked = issue_key(store, name="r", scopes=["secret:read"])
    revoke_key(store, revoked.record.id)
    client.get("/admin", headers={"API-Key": limited})  # a scope refusal spends the key's quota too
    for _ in range(3):
        client.get("/secret", headers={"API-Key": limited})
    client.get("/secret", headers={"API-Key": revoked.plaintext})
    client.get("/secret", headers={"API-Key": "kg_" + "0" * 50})
    text = scrape(client, admin)
    assert value(text, "keygate_rate_limited_total", kind="key") == 2
    assert value(text, "keygate_rate_limited_total", kind="auth_throttled") == 0
    assert value(text, "keygate_auth_refusals_total", code="key_revoked") == 1
    assert value(text, "keygate_auth_refusals_total", code="invalid_credentials") == 1
    assert value(text, "keygate_auth_refusals_total", code="insufficient_scope") == 1
    assert ("keygate_build_info", frozenset({("version", app_version())})) in samples(text)


def app_version() -> str:
    from api.openapi import package_version

    return package_version()


def test_keys_by_state_are_read_from_the_store_at_most_every_30_s(mem, monkeypatch) -> None:  # noqa: ANN001
    store, app, client = mem
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    issue_key(store, name="soon", scopes=["data:read"], expires_in=3 * 86400)
    issue_key(store, name="later", scopes=["data:read"], expires_in=30 * 86400)
    issue_key(store, name="gone", scopes=["data:read"], expires_in=10, now=time.time() - 100)
    revoke_key(store, issue_key(store, name="r", scopes=["data:read"]).record.id)
    rotate_key(store, issue_key(store, name="g", scopes=["data:read"], expires_in=86400).record.id, grace=3600)
    calls = []
    real = store.key_states
    monkeypatch.setattr(store, "key_states", lambda *a: calls.append(a) or real(*a))
    text = scrape(client, admin)
    # admin, soon, later, the rotated key's replacement (expires in a day) are active
    assert {s: value(text, "keygate_keys", state=s) for s in ("active", "grace", "revoked", "expired")} == {
        "active": 4, "grace": 1, "revoked": 1, "expired": 1}
    assert value(text, "keygate_keys_expiring", within="7d") == 3  # soon, g (grace), its replacement
    issue_key(store, name="new", scopes=["data:read"])
    scrape(client, admin)
    assert len(calls) == 1, "the second scrape reads no store"
    collector = app.extensions["keygate.metrics_collector"]
    collector._read_at -= 31  # noqa: SLF001 -- 31 s later
    assert value(scrape(client, admin), "keygate_keys", state="active") == 5
    assert len(calls) == 2


def test_a_scrape_during_a_store_outage_still_answers(mem, monkeypatch) -> None:  # noqa: ANN001
    store, app, client = mem
    reader = issue_key(store, name="prom", scopes=["metrics:read"]).plaintext
    assert client.get("/metrics", headers={"API-Key": reader}).status_code == 200

    def down(*_a: object) -> None:
        raise StoreUnavailable("the key store is unreachable; try again shortly")

    monkeypatch.setattr(store, "key_states", down)
    app.extensions["keygate.metrics_collector"]._read_at = -1e9  # noqa: SLF001
    text = scrape(client, reader)  # the key is in memory: the memory store's get still works
    assert "keygate_keys{" not in text and "keygate_build_info" in text


# -- outages: logged once, counted, and shown -------------------------------------------------


def test_an_outage_is_logged_once_as_it_starts_and_once_as_it_ends(make_app, tmp_path: Path, monkeypatch,
                                                                   caplog) -> None:  # noqa: ANN001
    from keys import open_store

    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    store.migrate()
    app = make_app(store)
    client = app.test_client()
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    key = issue_key(store, name="k", scopes=["secret:read"]).plaintext
    assert client.get("/secret", headers={"API-Key": key}).status_code == 200  # cached from now on
    caplog.set_level(logging.INFO, logger="keygate")
    real_revision = store.revision

    def down(*_a: object) -> None:
        raise StoreUnavailable("the key store is unreachable; try again shortly")

    monkeypatch.setattr(store, "revision", down)
    time.sleep(0.6)  # past the cache's bound: every request asks the store
    for _ in range(20):
        resp = client.get("/secret", headers={"API-Key": key})
        assert resp.status_code == 503
        assert resp.get_json(force=True)["request_id"] == resp.headers["X-Request-ID"]
    monkeypatch.setattr(store, "revision", real_revision)
    for _ in range(5):
        assert client.get("/secret", headers={"API-Key": key}).status_code == 200
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "keygate.backends"]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert "the key store is unavailable" in lines[0][1] and "available again" in lines[1][1]
    text = scrape(client, admin)
    assert value(text, "keygate_backend_errors_total", backend="store") == 20
    assert value(text, "keygate_backend_up", backend="store") == 1
    store.close()


def test_the_backend_gauge_shows_an_outage_of_the_rate_limiter(mem, monkeypatch) -> None:  # noqa: ANN001
    store, app, client = mem
    admin = issue_key(store, name="admin", scopes=["admin"]).plaintext
    limiter = app.extensions["keygate.ratelimits"].limiter
    real = limiter.hit, limiter.hit_unless

    def down(*_a: object, **_k: object) -> None:
        raise RateLimitUnavailable("the rate-limit store is unreachable (ConnectionError)")

    monkeypatch.setattr(limiter, "hit", down)
    monkeypatch.setattr(limiter, "hit_unless", down)  # the key's hit, with its address's throttle
    assert client.get("/admin", headers={"API-Key": admin}).status_code == 503
    monkeypatch.setattr(limiter, "ping", down)
    assert client.get("/readyz").status_code == 503
    monkeypatch.setattr(limiter, "hit", real[0])
    monkeypatch.setattr(limiter, "hit_unless", real[1])  # the scrape itself passes the limiter again
    text = samples(scrape(client, admin))
    # the scrape's own hit succeeded first: the outage is over by the time it is rendered
    assert text[("keygate_backend_errors_total", frozenset({("backend", "rate_limiter")}))] == 2
    assert text[("keygate_backend_up", frozenset({("backend", "rate_limiter")}))] == 1


# -- /readyz ---------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_readyz_answers_within_its_budget_when_a_backend_hangs(mem, monkeypatch) -> None:  # noqa: ANN001
    store, app, client = mem
    release = threading.Event()
    calls = []

    def hang() -> int:
        calls.append(1)
        release.wait(30)
        return 0

    monkeypatch.setattr(store, "revision", hang)
    for _ in range(3):
        started = time.monotonic()
        resp = client.get("/readyz")
        assert time.monotonic() - started < 2
        assert resp.status_code == 503
        body = resp.get_json(force=True)
        assert body["code"] == "store_unavailable" and "key store" in body["detail"]
        assert resp.headers["Retry-After"] == "5"
    assert len(calls) == 1, "a hung check is waited for again, not started again"
    release.set()
    deadline = time.monotonic() + 5
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # /healthz never asked anything
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_readyz_names_both_when_both_are_down(mem, monkeypatch) -> None:  # noqa: ANN001
    store, app, client = mem

    def down(*_a: object) -> None:
        raise StoreUnavailable("no store")

    monkeypatch.setattr(store, "revision", down)
    monkeypatch.setattr(app.extensions["keygate.ratelimits"].limiter, "ping",
                        lambda: (_ for _ in ()).throw(RateLimitUnavailable("no redis")))
    body = client.get("/readyz").get_json(force=True)
    assert body["code"] == "store_unavailable"
    assert "key store" in body["detail"] and "rate-limit store" in body["detail"]


# -- the store's key counts, on every backend ---------------------------------------------------


def test_key_states_on_every_backend(store) -> None:  # noqa: ANN001
    now = time.time()
    assert store.key_states(now, now + 7 * 86400) == {
        "active": 0, "grace": 0, "revoked": 0, "expired": 0, "expiring": 0}
    issue_key(store, name="a", scopes=["data:read"])
    issue_key(store, name="soon", scopes=["data:read"], expires_in=3600)
    issue_key(store, name="old", scopes=["data:read"], expires_in=1, now=now - 10)
    revoked = issue_key(store, name="r", scopes=["data:read"], expires_in=1, now=now - 10)
    revoke_key(store, revoked.record.id, now=now - 5)  # revoked and expired: revoked
    rotate_key(store, issue_key(store, name="g", scopes=["data:read"]).record.id, grace=60)
    assert store.key_states(now + 1, now + 7 * 86400) == {
        "active": 3, "grace": 1, "revoked": 1, "expired": 1, "expiring": 1}


# -- the JSON log format ----------------------------------------------------------------------


def test_a_json_log_line_is_one_line_whatever_it_holds() -> None:
    from api.logformat import JsonFormatter

    try:
        raise ValueError("bad\nthing kg_" + "A" * 50)
    except ValueError:
        exc = sys.exc_info()
    record = logging.LogRecord("keygate", logging.ERROR, __file__, 1, "line\r\nbreak \x1b[31m %s", ("é",), exc)
    text = JsonFormatter().format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    data = json.loads(text)
    assert data["level"] == "ERROR" and data["event"] == "line\r\nbreak \x1b[31m é"
    assert not re.search(r"kg_[0-9A-Za-z]{20,}", data["exception"]) and "[REDACTED]" in data["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])


def test_bad_log_format_is_one_clear_line(env: dict[str, str]) -> None:
    from conftest import assert_one_line_failure, run_cli

    proc = run_cli({**env, "KEYGATE_LOG_FORMAT": "xml"}, "serve", "--port", "1")
    assert_one_line_failure(proc, names="KEYGATE_LOG_FORMAT")


def test_the_metrics_directory_lives_in_the_instance_path(mem, tmp_path: Path) -> None:  # noqa: ANN001
    _, app, _ = mem
    directory = app.extensions["keygate.metrics"].directory
    assert directory.parent.parent == tmp_path and directory.name == "metrics"
    assert sorted(p.name.split("_")[0] for p in directory.glob("*.db")) == ["counter", "gauge", "histogram"]


def test_close_waits_for_a_metrics_flush_under_way(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from api.metrics import Metrics

    metrics = Metrics(tmp_path / "metrics")
    for _ in range(50):
        metrics.observe_request("/secret", "GET", 200, 0.001)
    histogram, entered, release = metrics._histogram, threading.Event(), threading.Event()

    def slow_histogram(*args: object) -> object:  # the flusher thread, stalled between taking and writing
        entered.set()
        release.wait(5)
        return histogram(*args)

    metrics._histogram = slow_histogram
    flusher = threading.Thread(target=metrics.flush)
    flusher.start()
    assert entered.wait(5)
    closer = threading.Thread(target=metrics.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waits for the flush it found under way
    release.set()
    flusher.join(5)
    closer.join(5)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "metrics"))
    text = generate_latest(registry).decode()
    assert value(text, "keygate_requests_total", route="/secret", method="GET", status="200") == 50
