"""Operations against real ``manage.py serve`` processes: /metrics summed over two workers,
JSON logs, /readyz through outages of PostgreSQL (a proxy that can cut or hang) and of
Redis (a private redis-server, killed or paused), and the README's Prometheus config."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, Server, make_database_url, run_cli, wait_for_workers
from private_redis import PrivateRedis
from test_observability import samples, value
from test_outages import TcpProxy

pytestmark = pytest.mark.slow


def _init(env: dict[str, str]) -> str:
    done = run_cli(env, "init", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["admin_key"]["key"]


def _fresh(server: Server, path: str, **kw):  # noqa: ANN202
    """One request on a connection of its own, so the two workers both get some."""
    with requests.Session() as s:
        return s.get(server.url + path, timeout=10, headers={"Connection": "close", **kw.pop("headers", {})}, **kw)


def _metrics(server: Server, key: str) -> str:
    resp = _fresh(server, "/metrics", headers={"API-Key": key})
    assert resp.status_code == 200, resp.text
    return resp.text


def _worker_counts(env: dict[str, str]) -> list[float]:
    """Each worker's own count of GET /secret 200, read from its file."""
    from prometheus_client.mmap_dict import MmapedDict

    out = []
    for path in sorted((Path(env["KEYGATE_INSTANCE_PATH"]) / "metrics").glob("counter_*.db")):
        for key, val, _at, _pos in MmapedDict.read_all_values_from_file(str(path)):
            if '"route": "/secret"' in key and '"status": "200"' in key:
                out.append(val)
    return out


def test_metrics_are_exact_sums_over_two_workers_and_random_paths_add_no_series(
        start_server, env: dict[str, str]) -> None:  # noqa: ANN001
    admin = _init(env)
    key = json.loads(run_cli(env, "create-key", "--name", "k", "--scope", "secret:read", "--json").stdout)["key"]
    server = start_server(workers=2)
    wait_for_workers(server, 2)
    # Which worker accepts a connection is up to the kernel and the server: on a busy machine
    # one worker can take every one of a few dozen. Send concurrent batches until each
    # worker's own file shows some, so the sums below really add two workers' counts.
    ok = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            codes = list(pool.map(lambda _: _fresh(server, "/secret", headers={"API-Key": key}).status_code,
                                  range(30)))
            assert codes == [200] * 30
            ok += 30
            time.sleep(1.2)  # each worker writes its counts to the shared files every second
            per_worker = _worker_counts(env)
            if len(per_worker) == 2 and all(n > 0 for n in per_worker):
                break
    assert len(per_worker) == 2 and all(n > 0 for n in per_worker), f"both workers served: {per_worker}"
    for _ in range(25):
        assert _fresh(server, "/secret", headers={"API-Key": "kg_" + "1" * 50}).status_code == 401
    for _ in range(15):
        assert _fresh(server, "/data", headers={"API-Key": key}).status_code == 403
    time.sleep(1.5)
    text = _metrics(server, admin)
    assert value(text, "keygate_requests_total", route="/secret", method="GET", status="200") == ok
    assert value(text, "keygate_requests_total", route="/secret", method="GET", status="401") == 25
    assert value(text, "keygate_requests_total", route="/data", method="GET", status="403") == 15
    assert value(text, "keygate_auth_refusals_total", code="invalid_credentials") == 25
    assert value(text, "keygate_auth_refusals_total", code="insufficient_scope") == 15
    assert value(text, "keygate_request_duration_seconds_count", route="/secret") == ok + 25
    assert value(text, "keygate_keys", state="active") == 2

    for i in range(10):  # unmatched paths have their series from the first one on ...
        assert _fresh(server, f"/first-{i}").status_code == 404
    time.sleep(1.5)  # ... once both workers have written them (and the scrapes' own series)
    series = len(samples(_metrics(server, admin)))
    with requests.Session() as s:  # ... and 1,000 more add none (keep-alive: a few seconds)
        for _ in range(1000):
            junk = secrets.token_urlsafe(12)
            assert s.get(f"{server.url}/{junk}/{uuid.uuid4()}?{junk}=1", timeout=10).status_code == 404
    time.sleep(1.5)
    after = samples(_metrics(server, admin))
    assert len(after) == series, "1,000 distinct paths added series"
    assert after[("keygate_requests_total",
                  frozenset({("route", "unmatched"), ("method", "GET"), ("status", "404")}))] == 1010


def test_json_logs_are_one_object_a_line_with_the_request_id_the_client_saw(
        start_server, env: dict[str, str]) -> None:  # noqa: ANN001
    admin = _init(env)
    key = json.loads(run_cli(env, "create-key", "--name", "k", "--scope", "data:read", "--json").stdout)
    server = start_server(workers=2, env_overrides={"KEYGATE_LOG_FORMAT": "json"})
    token = requests.post(server.url + "/tokens", headers={"API-Key": key["key"]}, timeout=10).json()["token"]
    seen: dict[str, tuple[str, int]] = {}
    cases = [
        ("/data", {"API-Key": key["key"]}),
        (f"/data?token={token}", {}),
        (f"/data?api_key={key['key']}", {}),
        ("/secret", {"User-Agent": f"agent {key['key']} \u00e9 \"quoted\"", "Referer": f"http://x/?token={token}"}),
        ("/nope\u00e9", {"X-Request-ID": "client-chosen.id_1"}),
        ("/metrics", {"API-Key": admin}),
        ("/readyz", {"X-Request-ID": "x" * 129}),
    ]
    for path, headers in cases:
        resp = requests.get(server.url + path, headers=headers, timeout=10)
        assert "X-Request-ID" in resp.headers, (path, resp.status_code, resp.headers, resp.text)
        seen[resp.headers["X-Request-ID"]] = (path, resp.status_code)
    assert "client-chosen.id_1" in seen and "x" * 129 not in seen
    deadline = time.monotonic() + 10
    while True:
        lines = server.output().splitlines()
        access = [json.loads(line) for line in lines if '"keygate.access"' in line]
        if {a["request_id"] for a in access} >= set(seen) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for line in lines:
        record = json.loads(line)  # every line, the server's own notices included
        assert {"time", "level", "logger", "event"} <= set(record), line
    by_id = {a["request_id"]: a for a in access}
    for rid, (path, status) in seen.items():
        entry = by_id[rid]
        assert entry["status"] == status and entry["method"] == "GET"
        assert set(entry) >= {"time", "level", "event", "request_id", "method", "route", "status",
                              "duration_ms", "key_id", "client"}
    assert by_id[next(r for r, (p, _) in seen.items() if p == "/data")]["key_id"] == key["id"]
    assert by_id["client-chosen.id_1"]["route"] == "unmatched"
    assert key["key"] not in server.output() and token not in server.output()
    # Server.stop's scan reads the JSON lines decoded as well.


def _ready(server: Server) -> tuple[int, float, dict]:
    started = time.monotonic()
    resp = requests.get(server.url + "/readyz", timeout=10)
    return resp.status_code, time.monotonic() - started, resp.json()


def _until_ready(server: Server, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _ready(server)[0] != 200:
        assert time.monotonic() < deadline, "not ready again after recovery"
        time.sleep(0.2)


def test_readyz_follows_postgresql_and_redis_outages_within_2_s(
        start_server, env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:  # noqa: ANN001
    url = make_database_url("postgresql", tmp_path, request)
    proxy = TcpProxy(("127.0.0.1", 5432))
    request.addfinalizer(proxy.close)
    redis = PrivateRedis(tmp_path / "redis")
    request.addfinalizer(redis.stop)
    overrides = {"KEYGATE_DATABASE_URL": url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"),
                 "KEYGATE_RATELIMIT_STORAGE_URL": redis.url}
    admin = _init({**env, **overrides})
    server = start_server(workers=1, env_overrides=overrides)
    status, _, body = _ready(server)
    assert status == 200 and body == {"status": "ready", "checks": {"store": "ok", "rate_limiter": "ok"}}

    for name, break_it, mend_it, code in [
        ("PostgreSQL cut", proxy.cut, proxy.restore, "store_unavailable"),
        ("PostgreSQL hung", proxy.hang, proxy.resume, "store_unavailable"),
        ("Redis stopped", redis.kill, redis.start, "rate_limit_unavailable"),
        ("Redis hung", redis.pause, redis.resume, "rate_limit_unavailable"),
    ]:
        break_it()
        for _ in range(3):
            status, took, body = _ready(server)
            assert status == 503 and took < 2, (name, status, took)
            assert body["code"] == code, (name, body)
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200, "liveness is not readiness"
        mend_it()
        _until_ready(server)

    # Each outage was logged once as it began and once as it ended, with the level.
    out = server.output()
    assert out.count("the key store is unavailable") == 2, out
    assert out.count("the key store is available again") == 2
    assert out.count("the rate-limit store is unavailable") == 2
    assert out.count("the rate-limit store is available again") == 2
    assert re.search(r"\[WARNING\] keygate\.backends: the key store is unavailable", out)
    text = _metrics(server, admin)
    assert value(text, "keygate_backend_up", backend="store") == 1
    assert value(text, "keygate_backend_errors_total", backend="store") >= 6
    assert value(text, "keygate_backend_errors_total", backend="rate_limiter") >= 6


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"### {title}")
    end = text.find("\n## ", start)
    return text[start:end]


def test_the_readme_prometheus_config_and_alert_rules_name_real_metrics(
        start_server, env: dict[str, str]) -> None:  # noqa: ANN001
    section = _readme_section("Monitoring")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    scrape = next(b for b in blocks if "scrape_configs" in b)["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert "API-Key" in scrape["http_headers"], "the scrape sends the key in the API-Key header"
    assert scrape["static_configs"][0]["targets"]
    rules = [r for b in blocks if "groups" in b for g in b["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} >= {"KeygateBackendDown", "KeygateRefusalSpike"}

    admin = _init(env)
    server = start_server()
    _fresh(server, "/secret")  # something to count
    exposed = {name for name, _ in samples(_metrics(server, admin))}
    families = exposed | {re.sub(r"_(bucket|count|sum)$", "", n) for n in exposed}
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "for", "labels", "annotations"}, rule
        names = set(re.findall(r"\bkeygate_[a-z_]+", rule["expr"]))
        assert names, rule["expr"]
        assert names <= families, f"{rule['alert']}: {names - families} not in a real /metrics answer"
        assert rule["expr"].count("(") == rule["expr"].count(")")
