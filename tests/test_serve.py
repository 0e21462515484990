"""``manage.py serve`` as an operator meets it: where it listens, HTTPS, and clients that
don't play nicely (idle, slow, oversized) against a real server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from api.config import default_workers, load_serve_settings
from conftest import ROOT, free_port, invoke_cli, run_cli, wait_for_workers
from keys import ConfigError

slow = pytest.mark.slow


@pytest.fixture
def key(env: dict[str, str]) -> str:
    """An initialised store with one secret:read key."""
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    made = invoke_cli(env, "create-key", "--name", "s", "--scope", "secret:read", "--json")
    return json.loads(made.stdout)["key"]


# -- clients that hold connections --------------------------------------------------------


class HeldConnections:
    """``idle`` sockets that send nothing and ``slow`` ones that send a request head one
    byte every ``pace`` seconds — what once took every worker of the server."""

    def __init__(self, port: int, idle: int, slow: int, pace: float = 0.5) -> None:
        self.stop = threading.Event()
        self.idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        self.slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(slow)]
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"

        def dribble() -> None:
            for i in range(len(head)):
                for s in self.slow:
                    try:
                        s.send(head[i:i + 1])
                    except OSError:
                        pass
                if self.stop.wait(pace):
                    return

        self.thread = threading.Thread(target=dribble, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.idle + self.slow:
            s.close()


@slow
def test_idle_and_slow_clients_cost_no_worker(env, key, start_server):
    """One worker, one thread: thirty connections that never finish a request still leave
    every request answered at once."""
    server = start_server(workers=1)
    held = HeldConnections(server.port, idle=20, slow=10)
    try:
        time.sleep(1)  # the slow ones are well into their heads
        for path, headers in (("/healthz", {}), ("/secret", {"API-Key": key})):
            started = time.monotonic()
            resp = requests.get(server.url + path, headers={**headers, "Connection": "close"}, timeout=2)
            assert resp.status_code == 200
            assert time.monotonic() - started < 2
    finally:
        held.close()


@slow
def test_keep_alive_serves_many_requests_on_one_connection(env, key, start_server):
    server = start_server()
    with requests.Session() as s:
        for _ in range(5):
            assert s.get(server.url + "/secret", headers={"API-Key": key}, timeout=5).status_code == 200
    log = server.output()
    # requests reuses its connection: all five came in over it (the server kept it open).
    assert log.count('"GET /secret HTTP/1.1" 200') == 5


@slow
def test_the_access_log_keeps_the_last_requests_of_a_server_that_stops(env, key, start_server):
    """The access log is written out in batches (every 0.25 s at most): a worker that exits
    writes out what it still holds."""
    server = start_server(workers=2)
    with requests.Session() as s:
        for _ in range(20):
            assert s.get(server.url + "/secret", headers={"API-Key": key}, timeout=5).status_code == 200
    server.proc.terminate()  # at once: the lines of the last requests are still in the batch
    server.proc.wait(20)
    assert server.output().count('"GET /secret HTTP/1.1" 200') == 20


def _children(pid: int) -> dict[int, bool]:
    """``pid``'s child processes, each with whether it has built the app yet (Linux: its
    maps hold the rate-limit table that create_app opens)."""
    found = {}
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found[int(child)] = "/ratelimits-" in Path(f"/proc/{child}/maps").read_text()
        except (OSError, ValueError, IndexError):
            continue
    return found


@slow
def test_a_server_stopped_while_its_workers_start_exits_at_once(env, key, tmp_path):
    """A stop right after start (a deploy rolled back, ``docker stop``) reached workers
    still building the app, whose stop handler was not set yet: they ignored it until
    the master killed them after the full grace period."""
    caught = 0
    for attempt in range(5):
        with open(tmp_path / f"serve-{attempt}.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(free_port()), "--workers", "2"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = time.monotonic() + 30
                while len(children := _children(proc.pid)) < 2 and time.monotonic() < deadline:
                    time.sleep(0.002)
                loading = not any(children.values())
                proc.terminate()
                started = time.monotonic()
                proc.wait(timeout=30)
                took = time.monotonic() - started
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if loading:
            caught += 1
            assert took < 5, f"stopped while its workers loaded the app: exit took {took:.1f} s"
    assert caught, "the stop never landed while the workers were loading the app"


@slow
def test_a_stop_sent_the_moment_a_worker_is_forked_is_never_lost() -> None:
    """The race behind the test above, made certain: CPython drops a signal that reaches a
    child before its after-fork handlers run, so the stop signals are held across the fork.
    Here a master whose own handler stops nothing forks 50 children and signals each as
    soon as fork() returns; every one must exit at once (without the hold, all 50 stay)."""
    code = """
import os, signal, sys, time
from api.server import _hold_stops, _release_stops, _stop_at_once_until_serving
os.register_at_fork(before=_hold_stops, after_in_parent=_release_stops,
                    after_in_child=_stop_at_once_until_serving)
signal.signal(signal.SIGTERM, lambda *a: None)  # the master's handler, which a fork inherits
lost = 0
for _ in range(50):
    pid = os.fork()
    if pid == 0:
        time.sleep(1)
        os._exit(3)  # still here: the stop was lost
    os.kill(pid, signal.SIGTERM)
    lost += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
print(lost)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", f"stops lost: {done.stdout.strip()} of 50"


@slow
def test_an_oversized_request_head_is_refused_and_the_server_carries_on(env, key, start_server):
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /secret HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * 100_000 + b"\r\n\r\n")
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
    assert answer == b"" or answer.split()[1] in (b"400", b"431")
    assert server.get("/secret", headers={"API-Key": key}).status_code == 200


@slow
def test_no_response_names_the_stack(env, key, start_server):
    server = start_server()
    for resp in (server.get("/healthz"), server.get("/secret"), server.get("/nope"),
                 server.get("/secret", headers={"API-Key": key})):
        assert resp.headers["Server"] == "keygate"
        assert "Strict-Transport-Security" not in resp.headers  # plain HTTP: no HSTS


# -- HTTPS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 and localhost (trustme)."""
    import trustme

    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": where / "ca.pem", "cert": where / "cert.pem", "key": where / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    return {name: str(path) for name, path in files.items()}


@slow
def test_https_end_to_end_with_hsts(env, key, start_server, tls):
    server = start_server(args=("--certfile", tls["cert"], "--keyfile", tls["key"]), verify=tls["ca"])
    assert server.url.startswith("https://")
    resp = server.get("/secret", headers={"API-Key": key})
    assert resp.status_code == 200 and resp.json()["message"] == "Welcome to the secret page!"
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
    refused = server.get("/secret")  # every response over TLS, refusals included
    assert refused.status_code == 401
    assert refused.headers["Strict-Transport-Security"] == "max-age=31536000"
    with pytest.raises(requests.exceptions.SSLError):  # a client that doesn't trust the CA
        requests.get(server.url + "/healthz", timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):  # and no plain HTTP on that port
        requests.get(server.url.replace("https://", "http://") + "/healthz", timeout=5)


@slow
def test_https_from_the_environment(env, key, start_server, tls):
    server = start_server(env_overrides={"KEYGATE_TLS_CERT": tls["cert"], "KEYGATE_TLS_KEY": tls["key"]},
                          verify=tls["ca"])
    resp = server.get("/secret", headers={"API-Key": key})
    assert resp.status_code == 200
    assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"


@slow
def test_https_behind_a_trusted_proxy_gets_hsts(env, key, start_server):
    """TLS ended at the load balancer: X-Forwarded-Proto counts once the proxy is trusted."""
    trusting = start_server(env_overrides={"KEYGATE_TRUSTED_PROXIES": "1"})
    proxied = {"API-Key": key, "X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"}
    assert trusting.get("/secret", headers=proxied).headers["Strict-Transport-Security"] == "max-age=31536000"
    untrusting = start_server()
    assert "Strict-Transport-Security" not in untrusting.get("/secret", headers=proxied).headers


@slow
@pytest.mark.parametrize("case", ["cert only", "key only", "missing file", "not pem", "mismatched"])
def test_bad_tls_files_stop_serve_in_one_line(env, key, tls, tmp_path, case):
    other = tmp_path / "other-key.pem"
    import trustme

    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    args = {
        "cert only": ["--certfile", tls["cert"]],
        "key only": ["--keyfile", tls["key"]],
        "missing file": ["--certfile", str(tmp_path / "nope.pem"), "--keyfile", tls["key"]],
        "not pem": ["--certfile", str(junk), "--keyfile", tls["key"]],
        "mismatched": ["--certfile", tls["cert"], "--keyfile", str(other)],
    }[case]
    result = run_cli(env, "serve", "--port", str(free_port()), *args, timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("--certfile" in lines[0] or "--keyfile" in lines[0]), result.stderr


# -- where it listens -----------------------------------------------------------------------


@slow
def test_host_port_and_workers_from_the_environment(env, key, start_server):
    port = free_port()
    e = {**env, "KEYGATE_HOST": "127.0.0.1", "KEYGATE_PORT": str(port), "PORT": str(free_port()),
         "KEYGATE_WORKERS": "2"}
    log = open(Path(env["KEYGATE_INSTANCE_PATH"]).parent / "env-server.log", "w")
    proc = subprocess.Popen([sys.executable, "manage.py", "serve"], env=e, cwd=Path(__file__).parent.parent,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = requests.get(f"http://127.0.0.1:{port}/secret", headers={"API-Key": key}, timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve never listened on KEYGATE_PORT"
                time.sleep(0.1)
        assert resp.status_code == 200
        assert len(wait_for_workers(SimpleNamespace(proc=proc, output=lambda: ""), 2)) == 2  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def test_serve_settings_precedence(monkeypatch):
    for name in ("KEYGATE_HOST", "KEYGATE_PORT", "PORT", "KEYGATE_WORKERS", "KEYGATE_TLS_CERT", "KEYGATE_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)
    plain = load_serve_settings()
    assert (plain.host, plain.port, plain.workers, plain.certfile) == ("127.0.0.1", 5000, default_workers(), None)
    monkeypatch.setenv("PORT", "8080")
    assert load_serve_settings().port == 8080  # a platform's PORT
    monkeypatch.setenv("KEYGATE_PORT", "9090")
    assert load_serve_settings().port == 9090  # keygate's own wins over PORT
    assert load_serve_settings(port=7070).port == 7070  # and --port over both
    monkeypatch.setenv("KEYGATE_WORKERS", "3")
    monkeypatch.setenv("KEYGATE_HOST", "0.0.0.0")
    s = load_serve_settings()
    assert (s.host, s.workers) == ("0.0.0.0", 3)
    assert load_serve_settings(host="::1", workers=1).host == "::1"


@pytest.mark.parametrize("name,value", [
    ("KEYGATE_PORT", "eighty"), ("KEYGATE_PORT", "0"), ("KEYGATE_PORT", "70000"), ("PORT", "-1"),
    ("KEYGATE_WORKERS", "0"), ("KEYGATE_WORKERS", "many"), ("KEYGATE_WORKERS", "1000"),
])
def test_bad_serve_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        load_serve_settings()
    assert name in e.value.detail


@slow
def test_a_bad_port_variable_stops_serve_in_one_line(env, key):
    result = run_cli({**env, "KEYGATE_PORT": "http"}, "serve", timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "KEYGATE_PORT" in result.stderr


def test_threads_follow_the_backends(monkeypatch):
    """One thread while every answer comes from this host; a few once requests may wait on
    the network, so one slow round trip isn't the whole worker's."""
    from api.config import default_threads, load_settings

    assert default_threads(load_settings({"DATABASE_URL": "sqlite:///x.db"})) == 1
    assert default_threads(load_settings({"DATABASE_URL": "memory://"})) == 1
    assert default_threads(load_settings({"DATABASE_URL": "postgresql://db/x"})) == 4
    assert default_threads(load_settings({"RATELIMIT_STORAGE_URL": "redis://cache:6379/0"})) == 4
    monkeypatch.setenv("KEYGATE_THREADS", "3")
    assert load_serve_settings().threads == 3
    assert load_serve_settings(threads=2).threads == 2
    monkeypatch.setenv("KEYGATE_THREADS", "0")
    with pytest.raises(ConfigError, match="KEYGATE_THREADS"):
        load_serve_settings()
