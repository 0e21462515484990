#!/usr/bin/env python
"""Machine instructions per request, keygate's app against its peers: a count, not a time.

bench_http.py's "keygate app / Flask-HTTPAuth app" row moves by ±15 % between runs on a
shared VM, more than any one change to the app. This script counts instead: each app
serves the same ``GET /secret`` (a valid key in ``API-Key``) in process, under valgrind's
callgrind, which counts the instructions executed — the same count whatever else the
machine runs. Only the timed loop is counted (``--toggle-collect`` on the C function
behind ``sum()``, which runs it); what the app's own threads (usage, metrics) do
meanwhile is counted too, as it is part of what a request costs. System calls' kernel
time and cache misses are not instructions, so a count is a floor, not a time: use it to
see what a change adds or removes, and bench_http.py for what a server does.

Apps (bench_auth.py builds keygate's, on a 1,000-key SQLite store):

* ``keygate``: the app as deployed (rate limits + usage, request ids + metrics);
* ``keygate, no rate-limit hook``: the same, its after-authentication hook (the limiter
  hit and the rate-limit headers) detached;
* ``keygate, no request ids + metrics``: the same, without ``api/instrument.py``;
* ``httpauth`` and ``restx``: bench/peers.py's Flask-HTTPAuth app and bare Flask-RESTX
  route, as bench_http.py serves them.

    python bench/bench_instructions.py [--requests 1000]   # ~1 minute; needs valgrind
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BATCH = 100
APPS = ("keygate", "keygate, no rate-limit hook", "keygate, no request ids + metrics", "httpauth", "restx")


def build(name: str) -> tuple[object, list[dict[str, str]]]:
    """The WSGI app called ``name`` and the environ extras of its requests."""
    sys.path[:0] = [str(ROOT), str(BENCH)]
    import bench_auth as ba

    fixture = ba.sqlite_fixture(1000)
    extras = [ba.api_key_header(fixture.keys[0])]
    if name in ("httpauth", "restx"):
        os.environ["BENCH_PEER_KEY"] = fixture.keys[0]
        import peers

        return (peers.httpauth_app() if name == "httpauth" else peers.restx_app()), extras
    bench = ba.limits_usage_app(fixture, Path(tempfile.mkdtemp(prefix="kg-instr-")))
    if name == "keygate, no rate-limit hook":
        bench.auth._after_identification.clear()  # noqa: SLF001
    elif name == "keygate, no request ids + metrics":
        bench.app.wsgi_app = bench.app.wsgi_app.app  # type: ignore[method-assign]
    return bench.app, extras


def child(name: str, requests: int) -> None:
    """Under callgrind: serve ``requests`` requests inside one ``sum()`` call."""
    app, extras = build(name)
    import bench_auth as ba  # on the path once build() ran

    case = ba.Case(name, app, "/secret", extras)
    ba.check_case(case)
    for _ in range(5):  # warm: caches filled, lazy imports done
        ba.run_batch(case, case.next_batch(BATCH))
    batches = [case.next_batch(BATCH) for _ in range(requests // BATCH)]
    gc.collect()
    gc.freeze()
    sum(map(lambda batch: ba.run_batch(case, batch), batches))  # the only code counted
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: nothing after the loop is of interest


def count(name: str, requests: int) -> float:
    """Instructions per request of app ``name``."""
    with tempfile.TemporaryDirectory(prefix="kg-callgrind-") as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--toggle-collect=builtin_sum",
             f"--callgrind-out-file={tmp}/callgrind.out", sys.executable, __file__,
             "--child", name, "--requests", str(requests)],
            capture_output=True, text=True, check=False, cwd=ROOT)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        sys.exit(f"{name}: callgrind failed:\n{out.stderr[-2000:]}")
    return int(found.group(1)) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per app (default 1000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.requests)
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt install valgrind)")
    print(f"instructions per GET /secret, {args.requests:,} requests per app, counted by callgrind "
          f"(Python {sys.version.split()[0]})")
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(APPS, pool.map(lambda name: count(name, args.requests), APPS)))
    keygate = counts["keygate"]
    print(f"\n{'app':<36} {'instructions':>12}  {'vs keygate':>10}")
    for name, n in counts.items():
        print(f"{name:<36} {n:>12,.0f}  {n - keygate:>+10,.0f}")
    for peer in ("httpauth", "restx"):
        print(f"keygate / {peer}: {keygate / counts[peer]:.3f}x the instructions")
    print(f"(bench_http.py's rows want keygate at >= 0.85x httpauth's req/s and >= 0.9x restx's: at most "
          f"{1 / 0.85:.3f}x and {1 / 0.9:.3f}x their cost a request, the server's share included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
