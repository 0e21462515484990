"""Hourly usage from a real server with two workers: every request counted once, in its
key's hour, by whichever worker served it (each flushes its own batch)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import run_cli, wait_for_workers

pytestmark = pytest.mark.slow


def test_hourly_counts_are_exact_across_two_workers(env, start_server):
    init = run_cli(env, "init", "--json")
    assert init.returncode == 0, init.stderr
    admin = json.loads(init.stdout)["admin_key"]["key"]
    created = run_cli(env, "create-key", "--name", "busy", "--scope", "data:read", "--rate-limit", "40/hour",
                      "--json")
    key = json.loads(created.stdout)
    server = start_server(workers=2)
    workers = wait_for_workers(server, 2)

    def call(path: str) -> int:
        return requests.get(server.url + path, headers={"API-Key": key["key"], "Connection": "close"},
                            timeout=10).status_code

    # Refusals for scope spend the key's quota too: 9 of its 40, then 55 requests it may make
    # (per hour: the 41st is not due for 90 s, however slowly a busy machine sends these).
    assert [call("/secret") for _ in range(9)] == [403] * 9
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(call, ["/data"] * 55))
    assert statuses.count(200) == 31 and statuses.count(429) == 24
    url = f"/admin/keys/{key['id']}/usage"
    expected = {"accepted": 31, "refused_limit": 24, "refused_scope": 9}
    deadline = time.monotonic() + 20  # each worker flushes every 5 s
    while True:
        totals = server.get(url, headers={"API-Key": admin}).json()["totals"]
        if totals == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert totals == expected, totals
    server.stop()  # each worker writes what it has left at exit: nothing more, nothing twice
    shown = run_cli(env, "usage", key["id"], "--since", "1h", "--json")
    buckets = json.loads(shown.stdout)["buckets"]
    assert {name: sum(b[name] for b in buckets) for name in expected} == expected
    assert len(workers) == 2
