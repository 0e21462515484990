"""Scale-out: two keygate instances sharing PostgreSQL (keys) and Redis (limits).

Each instance has its own instance directory, as two hosts would: nothing is
shared but the database and Redis.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import REDIS_URL, Server, invoke_cli, make_database_url, need_service, run_cli
from private_redis import forget_prefix, test_prefix

pytestmark = pytest.mark.slow

# Each instance polls the store's revision at most every 0.5 s (keys/cache.py).
PROPAGATION_BOUND = 1.0


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, env: dict[str, str]):
    """Two servers, A and B, on one PostgreSQL schema and one Redis; plus A's admin key."""
    need_service("Redis", "127.0.0.1", 6379)
    url = make_database_url("postgresql", tmp_path, request)
    prefix = test_prefix()
    request.addfinalizer(lambda: forget_prefix(prefix))
    shared = dict(env, KEYGATE_DATABASE_URL=url, KEYGATE_RATELIMIT_STORAGE_URL=REDIS_URL,
                  KEYGATE_RATELIMIT_PREFIX=prefix)
    init = invoke_cli(shared, "init", "--json")
    assert init.returncode == 0, init.stderr
    import json

    admin = json.loads(init.stdout)["admin_key"]["key"]
    servers = []
    for name in ("a", "b"):
        host_env = dict(shared, KEYGATE_INSTANCE_PATH=str(tmp_path / f"host-{name}"))
        servers.append(Server(host_env, workers=2, log_path=tmp_path / f"server-{name}.log"))
    yield servers[0], servers[1], admin
    for s in servers:
        s.stop()


def _create(server: Server, admin: str, **body: object) -> dict:
    r = server.request("POST", "/admin/keys", headers={"API-Key": admin},
                       json={"name": f"k-{uuid.uuid4().hex[:6]}", **body})
    assert r.status_code == 201, r.text
    return r.json()


def _refused_within(server: Server, bound: float, path: str, code: str, *,
                    headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> None:
    """Every worker of ``server`` refuses the request (401 ``code``) once ``bound`` seconds
    have passed since now; before that, only a 200 (not yet refused) or the 401 is allowed."""
    headers = {"Connection": "close", **(headers or {})}  # fresh connections reach every worker

    def get() -> requests.Response:
        return requests.get(server.url + path, headers=headers, params=params, timeout=5)

    start = time.monotonic()
    while time.monotonic() - start < bound:
        assert get().status_code in (200, 401)
        time.sleep(0.02)
    for _ in range(10):
        r = get()
        assert r.status_code == 401, f"still accepted {bound} s after revocation: {r.text}"
        assert r.json()["code"] == code


def test_created_on_a_works_on_b_and_revoked_on_a_is_refused_by_b(cluster):
    a, b, admin = cluster
    for _ in range(3):
        new = _create(a, admin, scopes=["secret:read"])
        # B has never seen the key: it is looked up on first use, at once.
        assert b.get("/secret", headers={"API-Key": new["key"]}).status_code == 200
        for _ in range(5):  # warm B's caches in both workers
            assert requests.get(b.url + "/secret", headers={"API-Key": new["key"], "Connection": "close"},
                                timeout=5).status_code == 200
        r = a.request("DELETE", f"/admin/keys/{new['id']}", headers={"API-Key": admin})
        assert r.status_code == 204
        # A refuses at once; B within the bound.
        assert a.get("/secret", headers={"API-Key": new["key"]}).json()["code"] == "key_revoked"
        _refused_within(b, PROPAGATION_BOUND, "/secret", "key_revoked", headers={"API-Key": new["key"]})


def test_rotation_on_a_stops_the_old_key_on_b(cluster):
    a, b, admin = cluster
    old = _create(a, admin, scopes=["secret:read"])
    assert b.get("/secret", headers={"API-Key": old["key"]}).status_code == 200
    r = a.request("POST", f"/admin/keys/{old['id']}/rotate", headers={"API-Key": admin}, json={})
    assert r.status_code == 201
    new_key = r.json()["key"]
    _refused_within(b, PROPAGATION_BOUND, "/secret", "key_revoked", headers={"API-Key": old["key"]})
    assert b.get("/secret", headers={"API-Key": new_key}).status_code == 200


def test_a_limit_is_shared_across_instances(cluster):
    a, b, admin = cluster
    key = _create(a, admin, scopes=["secret:read"], rate_limit="20/minute")["key"]

    def call(i: int) -> int:
        server = a if i % 2 else b
        return requests.get(server.url + "/secret", headers={"API-Key": key, "Connection": "close"},
                            timeout=10).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(40)))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 20
    # Another key is unaffected.
    other = _create(b, admin, scopes=["secret:read"], rate_limit="20/minute")["key"]
    assert a.get("/secret", headers={"API-Key": other}).status_code == 200


def test_a_token_minted_on_a_opens_data_on_b_until_revoked(cluster):
    a, b, admin = cluster
    key = _create(a, admin, scopes=["data:read"])
    token = a.request("POST", "/tokens", headers={"API-Key": key["key"]}, json={"ttl": 60}).json()["token"]
    assert b.get("/data", params={"token": token}).status_code == 200
    assert a.request("DELETE", f"/admin/keys/{key['id']}", headers={"API-Key": admin}).status_code == 204
    _refused_within(b, PROPAGATION_BOUND, "/data", "invalid_token", params={"token": token})


# -- issue 14: edits and console sessions, across instances ----------------------------


def _scope_refused_within(server: Server, bound: float, key: str) -> None:
    """Like ``_refused_within``, for a key whose scopes were narrowed: 403 ``insufficient_scope``
    on /secret from every worker of ``server`` once ``bound`` has passed."""
    headers = {"API-Key": key, "Connection": "close"}
    start = time.monotonic()
    while time.monotonic() - start < bound:
        assert requests.get(server.url + "/secret", headers=headers, timeout=5).status_code in (200, 403)
        time.sleep(0.02)
    for _ in range(10):
        r = requests.get(server.url + "/secret", headers=headers, timeout=5)
        assert r.status_code == 403 and r.json()["code"] == "insufficient_scope", r.text
        assert requests.get(server.url + "/data", headers=headers, timeout=5).status_code == 200


def _warm(server: Server, key: str) -> None:
    for _ in range(6):  # both workers have the record cached
        assert requests.get(server.url + "/secret", headers={"API-Key": key, "Connection": "close"},
                            timeout=5).status_code == 200


def console_session(server: Server, key: str) -> requests.Session:
    """A signed-in console session on ``server`` (cookies kept), each request on a new connection."""
    import re

    s = requests.Session()
    s.headers["Connection"] = "close"
    page = s.get(server.url + "/login", timeout=5)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = s.post(server.url + "/login", data={"api_key": key, "csrf_token": csrf}, allow_redirects=False, timeout=5)
    assert r.status_code == 303, r.text
    return s


def test_scopes_narrowed_on_a_by_patch_cli_or_console_are_refused_on_b(cluster):
    import re

    a, b, admin = cluster
    # PATCH on A
    key = _create(a, admin, scopes=["secret:read", "data:read"])
    _warm(b, key["key"])
    r = a.request("PATCH", f"/admin/keys/{key['id']}", headers={"API-Key": admin}, json={"scopes": ["data:read"]})
    assert r.status_code == 200, r.text
    _scope_refused_within(b, PROPAGATION_BOUND, key["key"])
    # update-key from a command line (a third process on the same store)
    key = _create(a, admin, scopes=["secret:read", "data:read"])
    _warm(a, key["key"])
    _warm(b, key["key"])
    done = run_cli(a.env, "update-key", key["id"], "--scope", "data:read")
    assert done.returncode == 0, done.stderr
    _scope_refused_within(a, PROPAGATION_BOUND, key["key"])
    _scope_refused_within(b, PROPAGATION_BOUND, key["key"])
    # the console on A
    key = _create(a, admin, scopes=["secret:read", "data:read"])
    _warm(b, key["key"])
    s = console_session(a, admin)
    form = s.get(f"{a.url}/dashboard/keys/{key['id']}/edit", timeout=5).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    r = s.post(f"{a.url}/dashboard/keys/{key['id']}/edit", allow_redirects=False, timeout=5,
               data={"csrf_token": csrf, "name": key["name"], "scope": "data:read"})
    assert r.status_code == 303, r.text
    _scope_refused_within(b, PROPAGATION_BOUND, key["key"])


def test_a_console_session_on_b_ends_when_its_key_is_revoked_on_a(cluster):
    a, b, admin = cluster
    key = _create(a, admin, scopes=["data:read"])
    s = console_session(b, key["key"])
    for _ in range(4):
        assert s.get(b.url + "/dashboard", allow_redirects=False, timeout=5).status_code == 200
    assert a.request("DELETE", f"/admin/keys/{key['id']}", headers={"API-Key": admin}).status_code == 204
    start = time.monotonic()
    while time.monotonic() - start < PROPAGATION_BOUND:
        assert s.get(b.url + "/dashboard", allow_redirects=False, timeout=5).status_code in (200, 303)
        time.sleep(0.02)
    r = s.get(b.url + "/dashboard", allow_redirects=False, timeout=5)
    assert r.status_code == 303 and r.headers["Location"] == "/login"
    # and a session on A, signed in before, ended too (it was deleted when refused, or is refused)
    assert s.get(a.url + "/dashboard", allow_redirects=False, timeout=5).status_code == 303
