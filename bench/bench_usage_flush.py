#!/usr/bin/env python3
"""What a usage flush costs per key in a 1,000,000-key SQLite store, against schema 5's flush.

A worker writes its counts every 5 s: one row per key it saw. When traffic spreads over
many keys (issue 10's row: 10,000 keys in turn), nearly every request adds a row to the next
flush, so the flush's cost per key is a cost per request. This prints, per key and in the
same run, alternating over the rounds on one copy of the store:

* **schema 5's flush** (the baseline): ``UPDATE api_keys`` per key (each one a page of a
  1,000,000-row table) plus the hourly upsert, both through ``Connection.execute(stmt, rows)``;
* **keygate's flush** (``SqlKeyStore.record_usage``): the upserts of ``key_usage`` and
  ``usage_hourly``, compiled once and run with the driver's ``executemany``.

CPU is the flushing thread's (``time.thread_time``); wall time includes the commit's fsync.

    python bench/bench_usage_flush.py [--keys 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_auth import key_id, sqlite_fixture  # bench/ is on sys.path

from keys.store.schema import keys_table, usage_table
from keys.store.sql import SqlKeyStore

HOUR = 3600
Usage = Mapping[str, tuple[float, int]]
Hourly = Mapping[tuple[str, int], tuple[int, int, int]]


def schema5_flush(store: SqlKeyStore) -> Callable[[Usage, Hourly], None]:
    """The flush as schema 5 wrote it (keys/store/sql.py before this change), for the baseline."""
    k = keys_table.c
    update = keys_table.update().where(k.id == sa.bindparam("b_id")).values(
        use_count=k.use_count + sa.bindparam("b_count"),
        last_used_at=sa.case((k.last_used_at.is_(None), sa.bindparam("b_at")),
                             (k.last_used_at < sa.bindparam("b_at"), sa.bindparam("b_at")),
                             else_=k.last_used_at))
    insert = sa.dialects.sqlite.insert(usage_table)
    names = ("accepted", "refused_limit", "refused_scope")
    upsert = insert.on_conflict_do_update(index_elements=[usage_table.c.key_id, usage_table.c.hour],
                                          set_={n: usage_table.c[n] + insert.excluded[n] for n in names})

    def flush(usage: Usage, hourly: Hourly) -> None:
        with store._write() as conn:
            conn.execute(update, [{"b_id": i, "b_at": at, "b_count": n} for i, (at, n) in sorted(usage.items())])
            conn.execute(upsert, [{"key_id": i, "hour": h, **dict(zip(names, c))}
                                  for (i, h), c in sorted(hourly.items())])
    return flush


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=5000, help="keys per flush (default 5,000: "
                        "what one of two workers sees in 5 s over 10,000 keys)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    fixture = sqlite_fixture(1_000_000)
    ids = [key_id(k) for k in fixture.keys]
    with tempfile.TemporaryDirectory(prefix="kg-bench-flush-") as tmp:
        db = Path(tmp) / "store.db"
        shutil.copy(fixture.database_url.removeprefix("sqlite:///"), db)
        store = SqlKeyStore(f"sqlite:///{db}")
        store.migrate()
        flushes = {"schema 5's flush (baseline)": schema5_flush(store), "keygate's flush": store.record_usage}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in flushes}
        rng = random.Random(1)
        print(f"1,000,000 keys; {args.keys:,} keys a flush; {args.rounds} rounds, alternating")
        for _ in range(args.rounds):
            for name, flush in flushes.items():
                keys = rng.sample(ids, min(args.keys, len(ids)))
                now = time.time()
                hour = int(now // HOUR * HOUR)
                cpu, wall = time.thread_time(), time.perf_counter()
                flush({i: (now, 3) for i in keys}, {(i, hour): (3, 0, 0) for i in keys})
                results[name].append(((time.thread_time() - cpu) / len(keys) * 1e6,
                                      (time.perf_counter() - wall) / len(keys) * 1e6))
        store.close()
    base = statistics.median(c for c, _ in results["schema 5's flush (baseline)"])
    print(f"\n{'flush':32s} {'CPU µs/key':>11s} {'wall µs/key':>12s} {'CPU ÷ baseline':>15s}")
    for name, runs in results.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        print(f"{name:32s} {cpu:11.1f} {wall:12.1f} {cpu / base:14.2f}×")
    print("(medians over the rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
