#!/usr/bin/env python3
"""Two keygate servers side by side, before and after a change: wrk rounds, alternating.

bench_ab.py compares two trees in process; a change can look different under a real
server (system calls, shared memory and the other worker cost more there). This starts
``manage.py serve --workers 2`` from git REF (``--ref``, default ``main``, exported to a
temporary directory) and from this checkout, each on its own SQLite store with one key
whose limit is never reached, and sends ``GET /secret`` with ``wrk -t1`` to one, then the
other, in an order that flips every round. It prints each round, then the median ratio of
req/s and of server CPU per request (this checkout over REF) with a 95 % bootstrap
interval over the rounds.

``--same`` runs REF against itself: the noise floor of the machine, to read a result
against. ``--env NAME=VALUE`` sets a variable for this checkout's server only (a setting
switched on one side: ``--same --env KEYGATE_RATELIMIT_STORAGE_URL=memory://``).

    python bench/bench_ab_server.py [--ref REF | --same] [--rounds 12] [--env NAME=VALUE]   # ~2 min; needs wrk
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_http as bh  # the servers and wrk, as the rows measure them
from bench_ab import bootstrap_ratio, export

WARMUP_S = 2


def start(tree: Path, name: str, work: Path, extra_env: dict[str, str]) -> tuple[bh.Server, str]:
    """``serve --workers 2`` from ``tree`` on a store of its own, and the key to send it."""
    env = bh.keygate_env(work / name, f"sqlite:///{work / name / 'keygate.db'}")
    env.update(PYTHONPATH=str(tree), **extra_env)
    bh.cli(env, "init", "--no-admin-key", root=tree)
    key = json.loads(bh.cli(env, "create-key", "--name", "ab", "--scope", "secret:read",
                            "--rate-limit", bh.HUGE_LIMIT, "--json", root=tree))["key"]
    return bh.serve_keygate(name, env, work, root=tree), key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="main", help="the git ref to compare with (default: main)")
    ap.add_argument("--same", action="store_true", help="REF against itself: the noise floor")
    ap.add_argument("--rounds", type=int, default=12, help="wrk runs per server (default 12)")
    ap.add_argument("--seconds", type=int, default=3, help="seconds per wrk run (default 3)")
    ap.add_argument("--conns", type=int, default=8, help="wrk connections (default 8)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="set for this checkout's server only (repeatable)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt install wrk)")
    extra = dict(e.split("=", 1) for e in args.env if "=" in e)
    if len(extra) != len(args.env):
        sys.exit("--env takes NAME=VALUE")
    b_name = f"{args.ref} again" if args.same else "this checkout"
    with tempfile.TemporaryDirectory(prefix="keygate-abs-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        (work / "ref").mkdir()
        ref_tree = export(args.ref, work / "ref")
        b_tree = ref_tree if args.same else ROOT
        servers = {}
        for name, tree, env in ((args.ref, ref_tree, {}), (b_name, b_tree, extra)):
            server, key = start(tree, name.replace(" ", "-").replace("/", "_"), work, env)
            stack.callback(server.stop)
            servers[name] = (server, {"API-Key": key})
        print(f"{args.ref} against {b_name}{' with ' + ' '.join(args.env) if args.env else ''}: "
              f"serve --workers {bh.WORKERS}, wrk -t1 -c{args.conns}, {args.seconds} s × {args.rounds} rounds each")
        for server, headers in servers.values():
            bh.wrk(server, "/secret", args.conns, WARMUP_S, headers=headers)
        runs: dict[str, list[bh.Run]] = {name: [] for name in servers}
        order = list(servers)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                server, headers = servers[name]
                run = bh.wrk(server, "/secret", args.conns, args.seconds, headers=headers)
                if run.bad:
                    sys.exit(f"{name}: {run.bad} failed requests")
                runs[name].append(run)
            print(f"  round {r + 1:2d}: " + "   ".join(f"{n} {runs[n][-1].show()}" for n in order), flush=True)
    rng = random.Random(1)
    a, b = runs[args.ref], runs[b_name]
    for what, get in (("req/s", lambda x: x.rps), ("CPU µs/request", lambda x: x.cpu_us)):
        ma, mb = statistics.median(map(get, a)), statistics.median(map(get, b))
        low, high = bootstrap_ratio([get(x) for x in a], [get(x) for x in b], rng)
        print(f"{what:<15} {args.ref}: {ma:8.1f}   {b_name}: {mb:8.1f}   ratio {mb / ma:.3f} "
              f"(95 % interval {low:.3f}–{high:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
