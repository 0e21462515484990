#!/usr/bin/env python3
"""How long a key revoked on instance A keeps working on instance B.

Starts two `manage.py serve` instances (2 workers each) sharing one PostgreSQL
schema and one Redis, then, for each trial: creates a key on A, warms it into
both of B's workers' caches, revokes it on A and polls B (fresh connection per
request, so both workers answer) until B has refused it 5 times in a row. The
propagation time is from the revoke's 204 to the first of those refusals.

    python bench/bench_revocation.py [--trials 20]

Needs PostgreSQL at 127.0.0.1:5432 (database `test`) and Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PG = os.environ.get("KEYGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("KEYGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--port", str(port), "--workers", "2"],
        env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(url + "/healthz", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit(f"server did not start; see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()

    schema = "kg_bench_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(PG.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as c:
        c.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    tmp = Path(tempfile.mkdtemp(prefix="kg-bench-rev-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    env.update(
        KEYGATE_DATABASE_URL=f"{PG}?options=-csearch_path%3D{schema}",
        KEYGATE_RATELIMIT_STORAGE_URL=REDIS,
        KEYGATE_SECRET_KEY=secrets.token_urlsafe(48),
        KEYGATE_DEFAULT_RATE_LIMIT="100000/minute",
        KEYGATE_INSTANCE_PATH=str(tmp / "a"),
    )
    procs = []
    try:
        init = subprocess.run([sys.executable, str(ROOT / "manage.py"), "init", "--json"],
                              env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        admin = {"API-Key": json.loads(init.stdout)["admin_key"]["key"]}
        proc_a, a = start(env, tmp / "a.log")
        proc_b, b = start(dict(env, KEYGATE_INSTANCE_PATH=str(tmp / "b")), tmp / "b.log")
        procs = [proc_a, proc_b]
        close = {"Connection": "close"}
        times = []
        for _ in range(args.trials):
            key = requests.post(a + "/admin/keys", headers=admin,
                                json={"name": "bench", "scopes": ["secret:read"]}).json()
            hdr = {"API-Key": key["key"], **close}
            for _ in range(6):
                assert requests.get(b + "/secret", headers=hdr).status_code == 200
            assert requests.delete(f"{a}/admin/keys/{key['id']}", headers=admin).status_code == 204
            revoked = time.monotonic()
            first_refusal, streak = None, 0
            while streak < 5:
                status = requests.get(b + "/secret", headers=hdr).status_code
                if status == 401:
                    first_refusal = first_refusal or time.monotonic()
                    streak += 1
                else:
                    first_refusal, streak = None, 0
            times.append(first_refusal - revoked)
            time.sleep(0.1)
        ms = sorted(t * 1000 for t in times)
        print(f"revocation propagation A -> B over {len(ms)} trials (2 instances x 2 workers, "
              f"PostgreSQL + Redis, cache staleness bound 500 ms)")
        print(f"  min {ms[0]:.0f} ms   median {statistics.median(ms):.0f} ms   max {ms[-1]:.0f} ms"
              f"   -> {'PASS' if ms[-1] < 1000 else 'FAIL'} (target: < 1000 ms)")
    finally:
        for p in procs:
            p.terminate()
            p.wait(15)
        with engine.begin() as c:
            c.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
