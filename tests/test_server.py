"""``manage.py serve``: a real server process (granian), real sockets, real access log.

The server runs once per worker count (1 and 2) for the whole module; keys are
made with the real CLI while it runs. Every plaintext the tests issue is
recorded, and the last test checks none ever reached the server's output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from conftest import Server, invoke_cli, run_cli, strong_secret, wait_for_workers
from keys import generate_key, issue_key, open_store

pytestmark = pytest.mark.slow

KEY_SHAPED = re.compile(r"kg_[0-9A-Za-z]{40,}")
PROBLEM = "application/problem+json"


class Live:
    """A running server, its environment, and every secret handed out while it ran."""

    def __init__(self, env: dict[str, str], server: Server, admin: str) -> None:
        self.env = env
        self.server = server
        self.secrets: list[str] = [admin]
        self.admin = admin

    def cli(self, *args: str, input: str | None = None) -> str:
        result = invoke_cli(self.env, *args, input=input)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def create(self, *args: str) -> dict:
        made = json.loads(self.cli("create-key", "--name", "t", *args, "--json"))
        self.secrets.append(made["key"])
        return made

    def issue(self, **kw: object) -> str:
        """A key written straight into the server's store (for states the CLI cannot make)."""
        store = open_store(self.env["KEYGATE_DATABASE_URL"])
        try:
            plaintext = issue_key(store, name="direct", **kw).plaintext  # type: ignore[arg-type]
        finally:
            store.close()
        self.secrets.append(plaintext)
        return plaintext

    def get(self, path: str, key: str | None = None, **kw: object) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})  # type: ignore[arg-type]
        if key is not None:
            headers["API-Key"] = key
        return self.server.get(path, headers=headers, **kw)


def _env(base: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    e.update(
        KEYGATE_INSTANCE_PATH=str(base / "instance"),
        KEYGATE_DATABASE_URL=f"sqlite:///{base / 'instance' / 'keygate.db'}",
        KEYGATE_SECRET_KEY=strong_secret(),
        PYTHONUNBUFFERED="1",
    )
    return e


@pytest.fixture(scope="module", params=[1, 2], ids=["1-worker", "2-workers"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    env = _env(tmp_path_factory.mktemp(f"serve{request.param}"))
    init = invoke_cli(env, "init")
    assert init.returncode == 0, init.stderr
    server = Server(env, workers=request.param)
    try:
        wait_for_workers(server, request.param)  # so requests can reach (and revocation must reach) each
        yield Live(env, server, init.stdout.strip())
    finally:
        server.stop()


def assert_problem(resp: requests.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["code"] == code
    assert {"type", "title", "status", "detail", "code", "instance"} <= body.keys()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    if status in (401, 403, 429):
        assert resp.headers["Cache-Control"] == "no-store"
    if status == 401:
        challenge = resp.headers["WWW-Authenticate"]
        assert challenge.startswith('ApiKey realm="keygate"')
        if code == "missing_credentials":
            assert challenge == 'ApiKey realm="keygate"'
        else:
            assert 'error="invalid_token"' in challenge
    return body


def raw_request(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (requests and http.client refuse NUL and non-ASCII)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def raw_get(server: Server, path: bytes, api_key: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    header = b"" if api_key is None else b"API-Key: " + api_key + b"\r\n"
    return raw_request(server, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                       + b"Connection: close\r\n\r\n")


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """The access log is written just after the response is sent: give it a moment."""
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


# -- the happy path -------------------------------------------------------------------------


def test_healthz(live: Live) -> None:
    resp = live.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


def test_secret_with_a_key_made_by_the_cli(live: Live) -> None:
    key = live.create("--scope", "secret:read")["key"]
    resp = live.get("/secret", key)
    assert resp.status_code == 200, resp.text
    assert resp.json()["message"] == "Welcome to the secret page!"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # the one-time admin key from `init` opens everything
    assert live.get("/admin", live.admin).json()["message"] == "Welcome, admin!"


# -- refusals -------------------------------------------------------------------------------


def test_missing_key(live: Live) -> None:
    assert_problem(live.get("/secret"), 401, "missing_credentials")


def test_invalid_keys_get_one_answer(live: Live) -> None:
    real = live.create("--scope", "secret:read")
    unknown = generate_key().plaintext
    wrong_secret = generate_key(key_id=real["id"]).plaintext  # right id, valid checksum, wrong secret
    mistyped = real["key"][:-1] + ("A" if real["key"][-1] != "A" else "B")
    live.secrets += [unknown, wrong_secret]
    bodies = [
        assert_problem(live.get("/secret", value), 401, "invalid_credentials")
        for value in (unknown, wrong_secret, mistyped, "kg_short", "not a key at all", real["id"])
    ]
    assert len({b["detail"] for b in bodies}) == 1  # nothing to tell them apart


# Workers cache verified keys and re-check the store's revision at most every 0.5 s
# (keys/cache.py): a revocation from another process is refused within that bound.
REVOCATION_BOUND = 1.0


def refused_after_bound(live: Live, key: str) -> None:
    """Within the bound every answer is 200 or the refusal; after it, only the refusal."""
    start = time.monotonic()
    while time.monotonic() - start < REVOCATION_BOUND:
        assert live.get("/secret", key).status_code in (200, 401)
        time.sleep(0.05)
    for _ in range(6):  # on every worker, without a restart
        assert_problem(live.get("/secret", key), 401, "key_revoked")


def test_revoked_by_the_cli_while_serving(live: Live) -> None:
    made = live.create("--scope", "secret:read")
    assert live.get("/secret", made["key"]).status_code == 200
    live.cli("revoke-key", made["id"])
    refused_after_bound(live, made["key"])
    # …but only for the holder of the secret: a wrong secret for that id learns nothing
    wrong = generate_key(key_id=made["id"]).plaintext
    assert_problem(live.get("/secret", wrong), 401, "invalid_credentials")


def test_revoked_by_value_from_stdin_while_serving(live: Live) -> None:
    made = live.create("--scope", "secret:read")
    assert live.get("/secret", made["key"]).status_code == 200
    live.cli("revoke-key", "--key", "-", input=made["key"] + "\n")
    refused_after_bound(live, made["key"])


def test_expired_key(live: Live) -> None:
    key = live.issue(scopes=["secret:read"], expires_in=60, now=time.time() - 3600)
    assert_problem(live.get("/secret", key), 401, "key_expired")


def test_wrong_scope(live: Live) -> None:
    key = live.create("--scope", "data:read")["key"]
    body = assert_problem(live.get("/secret", key), 403, "insufficient_scope")
    assert "secret:read" in body["detail"]
    assert live.get("/data", key).status_code == 200
    assert_problem(live.get("/admin", key), 403, "insufficient_scope")


def test_ip_allow_list(live: Live) -> None:
    elsewhere = live.create("--scope", "secret:read", "--allow-ip", "10.0.0.0/8")["key"]
    assert_problem(live.get("/secret", elsewhere), 403, "ip_not_allowed")
    here = live.create("--scope", "secret:read", "--allow-ip", "10.0.0.0/8", "--allow-ip", "127.0.0.0/8")
    assert live.get("/secret", here["key"]).status_code == 200


def test_an_8kb_api_key_header_is_a_401_problem(live: Live) -> None:
    value = "kg_" + "".join(secrets.choice("abcdefXYZ0123") for _ in range(8189))
    live.secrets.append(value)
    resp = live.get("/secret", value)
    assert_problem(resp, 401, "invalid_credentials")


@pytest.mark.parametrize("value", [
    b"kg_\x00" + b"A" * 49,           # NUL
    b"\x01\x02\x7f",                  # other control bytes
    "kg_é".encode() + b"A" * 48,      # UTF-8
    b"\xff\xfe" * 26,                 # not UTF-8 at all
    b"kg_\x80" + b"A" * 49,
], ids=["nul", "control", "utf8", "latin1", "high-bit"])
def test_odd_bytes_in_the_header_are_refused_never_a_5xx(live: Live, value: bytes) -> None:
    status, headers, body = raw_get(live.server, b"/secret", value)
    assert 400 <= status < 500
    if status == 401:  # reached the app: then it is the usual problem
        assert headers["content-type"].startswith(PROBLEM)
        assert json.loads(body)["code"] == "invalid_credentials"
        assert headers["www-authenticate"].startswith('ApiKey realm="keygate"')
    # and the server is still fine afterwards
    assert live.get("/healthz").status_code == 200


def test_odd_bytes_around_a_real_key(live: Live) -> None:
    key = live.create("--scope", "secret:read")["key"].encode()
    for value in (key[:10] + b"\x00" + key[11:], key[:-1] + b"\xe9", key + b"\xc3\xa9"):
        status, _headers, _body = raw_get(live.server, b"/secret", value)
        assert 400 <= status < 500


def test_a_chunked_body_is_read_only_up_to_the_limit(live: Live) -> None:
    """No Content-Length to check first: the body is read up to 64 KiB and no further."""
    url, headers = live.server.url + "/tokens", {"API-Key": live.admin, "Content-Type": "application/json"}

    def chunks(total: int):  # noqa: ANN202 — requests sends a generator chunked
        yield b'{"ttl": 60, "pad": "'
        for _ in range(total // 4096):
            yield b"x" * 4096
        yield b'"}'

    huge = requests.post(url, data=chunks(2 * 1024 * 1024), headers=headers, timeout=30)
    assert assert_problem(huge, 413, "payload_too_large")["detail"] == "body must be at most 65536 bytes"
    small = requests.post(url, data=iter([b'{"ttl": ', b"60}"]), headers=headers, timeout=10)
    assert small.status_code == 201, small.text
    live.secrets.append(small.json()["token"])
    assert requests.get(live.server.url + "/healthz", timeout=10).status_code == 200


def test_unknown_path_is_a_404_problem(live: Live) -> None:
    body = assert_problem(live.get("/no/such/thing"), 404, "not_found")
    assert body["instance"] == "/no/such/thing"


def test_wrong_method_is_a_405_problem_with_allow(live: Live) -> None:
    resp = live.server.request("POST", "/secret", headers={"API-Key": live.admin})
    assert_problem(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"] and "POST" not in resp.headers["Allow"]


def test_both_credentials_is_a_400(live: Live) -> None:
    key = live.create("--scope", "data:read")["key"]
    assert_problem(live.get("/data?token=x", key), 400, "multiple_credentials")


# -- the log --------------------------------------------------------------------------------


def test_credentials_in_urls_are_redacted_in_the_access_log(live: Live) -> None:
    token = "SOMETHINGSECRET" + secrets.token_hex(8)
    key = live.create("--scope", "data:read")["key"]
    assert_problem(live.get(f"/data?token={token}"), 401, "invalid_token")
    # A raw key is never accepted in a URL, but a careless client may still send one.
    resp = live.get(f"/data?api_key={key}&page=2")
    assert resp.status_code >= 400
    live.secrets += [token]
    wait_for(lambda: "page=2" in live.server.output(), "the api_key request in the access log")
    log = live.server.output()
    assert "/data?token=[REDACTED]" in log
    assert "/data?api_key=[REDACTED]&page=2" in log
    assert token not in log and key not in log


def test_malformed_request_lines_do_not_leak_into_any_log(live: Live) -> None:
    key = live.create("--scope", "data:read")["key"].encode()
    marker = secrets.token_hex(6)
    # The server refuses these itself (bytes a request target can't hold), before the app.
    for line in (b"GET /data?api_key=" + key + b"\x01&m=" + marker.encode() + b" HTTP/1.1",
                 b"GET /data?token=" + key + b"&m=" + marker.encode() + b"\x7f HTTP/1.1"):
        status, _headers, _body = raw_request(live.server, line + b"\r\nHost: x\r\n\r\n")
        assert 400 <= status < 500
    live.get(f"/healthz?m={marker}")  # logged after the two above: the log has caught up
    wait_for(lambda: f"m={marker}" in live.server.output(), "the marker request in the access log")
    assert key.decode() not in live.server.output()


def test_no_secret_ever_reaches_the_server_output(live: Live) -> None:
    # one more of everything, then read the whole access + error log
    key = live.create("--scope", "secret:read")["key"]
    assert live.get("/secret", key, headers={"Referer": f"http://x/?api_key={key}"}).status_code == 200
    # a key pasted into a User-Agent, and a key in a Referer under a name nobody would guess
    assert live.get("/secret", key, headers={"User-Agent": f"my-script/1.0 ({key})",
                                             "Referer": f"http://x/?next={key}"}).status_code == 200
    # a token whose parameter name is percent-encoded: werkzeug decodes it, so the server
    # honours it; the log must not miss it either
    reader = live.create("--scope", "data:read")
    token = json.loads(live.cli("mint-token", reader["id"], "--json"))["token"]
    live.secrets.append(token)
    assert live.get(f"/data?%74oken={token}").status_code == 200
    marker = secrets.token_hex(6)
    live.get(f"/healthz?m={marker}")
    wait_for(lambda: marker in live.server.output(), "the last request in the access log")
    log = live.server.output()
    assert len(live.secrets) > 5
    for secret in live.secrets:
        assert secret not in log
    assert not KEY_SHAPED.search(log), KEY_SHAPED.search(log)


# -- servers of their own ----------------------------------------------------------------------


def test_default_rate_limit_from_the_environment(env: dict[str, str], start_server) -> None:  # noqa: ANN001
    assert invoke_cli(env, "init", "--no-admin-key").returncode == 0
    made = json.loads(invoke_cli(env, "create-key", "--name", "n", "--scope", "secret:read", "--json").stdout)
    server = start_server(workers=2, env_overrides={"KEYGATE_DEFAULT_RATE_LIMIT": "3/minute"})
    wait_for_workers(server, 2)  # the limit is shared by every worker of the host
    statuses = [server.get("/secret", headers={"API-Key": made["key"]}) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert_problem(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert made["key"] not in server.output()


def test_serve_refuses_an_uninitialised_store(env: dict[str, str]) -> None:
    from conftest import free_port

    result = run_cli(env, "serve", "--port", str(free_port()), timeout=30)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "init" in result.stderr
