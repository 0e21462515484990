#!/usr/bin/env python
"""bench_auth.py's series, before and after a change, measured side by side in one run.

Two worker processes serve the same series of requests (bench_auth.py's own scenarios,
built by each tree's own bench_auth.py on a 1,000-key SQLite store): one runs this
checkout, the other git REF (``--ref``, default ``main``), exported to a temporary
directory. The parent asks them for one batch at a time, alternating between the two
trees in a fresh random order every round, so whatever else the machine is doing lands
on both alike; separate runs on a shared machine differ by more than the change being
measured. Each series reports the median µs per request of each tree and their ratio,
with a 95 % bootstrap interval over the rounds, and the fastest batch of each (on a
busy machine, the cost of a request when nothing else got in the way).

    python bench/bench_ab.py                    # this checkout against main
    python bench/bench_ab.py --ref 4180d6f --rounds 400 --cpu 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in each worker: build the series with that tree's bench_auth.py, then serve batches.
WORKER = r"""
import contextlib, gc, importlib.util, json, sys
root, n_keys, batch, cpu = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if cpu >= 0:
    import os
    os.sched_setaffinity(0, {cpu})
out = sys.stdout
sys.stdout = sys.stderr  # what setup prints ("building ...") stays off the answers
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("bench_auth", root + "/bench/bench_auth.py")
ba = importlib.util.module_from_spec(spec)
sys.modules["bench_auth"] = ba  # dataclasses look their module up
spec.loader.exec_module(ba)
import api, tempfile
from pathlib import Path
fixture = ba.sqlite_fixture(n_keys)
instance = Path(tempfile.mkdtemp(prefix="keygate-ab-"))
cases, built = {}, {}
for scenario in ba.SCENARIOS:
    if scenario.make_app not in built:
        app = scenario.make_app(fixture, instance / str(len(built)))
        built[scenario.make_app] = app
        base = ba.Case(f"baseline ({scenario.make_app.__name__})", app.app.wsgi_app, app.baseline_path,
                       [ba.api_key_header(fixture.keys[0])])
        ba.check_case(base)
        cases[base.label] = base
    app = built[scenario.make_app]
    case = ba.Case(scenario.name, app.app.wsgi_app, scenario.path, scenario.credentials(fixture, app))
    ba.check_case(case, fixture, scenario.expect_headers)
    cases[case.label] = case
sys.stdout = out
print(json.dumps({"code": api.__file__, "cases": list(cases)}), flush=True)
gc.collect(); gc.freeze(); gc.disable()
for line in sys.stdin:
    case = cases[line.strip()]
    extras = case.next_batch(batch)
    gc.collect()
    print(ba.run_batch(case, extras) / batch, flush=True)
for app in built.values():
    app.app.extensions["keygate.usage"].close()
"""


def export(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--ref {ref}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def bootstrap_ratio(a: list[float], b: list[float], rng: random.Random, n: int = 2000) -> tuple[float, float]:
    """95 % interval of median(b) / median(a), resampling rounds (pairs stay together)."""
    pairs = list(zip(a, b))
    ratios = []
    for _ in range(n):
        sample = [rng.choice(pairs) for _ in pairs]
        ratios.append(statistics.median(y for _, y in sample) / statistics.median(x for x, _ in sample))
    ratios.sort()
    return ratios[int(0.025 * n)], ratios[int(0.975 * n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="main", help="the git ref to compare with (default: main)")
    ap.add_argument("--keys", type=int, default=1000, help="keys in the SQLite store (default 1000)")
    ap.add_argument("--rounds", type=int, default=300, help="timed batches per series and tree (default 300)")
    ap.add_argument("--batch", type=int, default=200, help="requests per batch (default 200)")
    ap.add_argument("--cpu", type=int, default=-1, metavar="N",
                    help="run both workers on CPU N only (Linux): neither migrates, both share its noise")
    args = ap.parse_args(argv)
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="keygate-ab-ref-") as tmp:
        trees = {args.ref: export(args.ref, Path(tmp)), "this checkout": ROOT}
        workers, hello = {}, {}
        for name, root in trees.items():  # one at a time: each builds its store first
            workers[name] = subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(args.keys), str(args.batch),
                                              str(args.cpu)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
            line = workers[name].stdout.readline()
            if not line:
                raise SystemExit(f"the worker for {name} failed (its error is above)")
            hello[name] = json.loads(line)
        for name, h in hello.items():
            print(f"{name}: {h['code']}")
        cases = [c for c in hello[args.ref]["cases"] if c in hello["this checkout"]["cases"]]
        samples: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in cases}
        jobs = [(t, c) for t in trees for c in cases]
        for r in range(5 + args.rounds):
            rng.shuffle(jobs)
            for tree, case in jobs:
                w = workers[tree]
                w.stdin.write(case + "\n")
                w.stdin.flush()
                value = float(w.stdout.readline())
                if r >= 5:
                    samples[(tree, case)].append(value)
        for w in workers.values():
            w.stdin.close()
            w.wait(60)
    print(f"\n{args.rounds} rounds × {args.batch} requests per series and tree, 1 store of {args.keys:,} keys; "
          "µs per request (medians)\n")
    print(f"{'series':<32} {args.ref[:12]:>12} {'this':>8} {'this/ref':>9}  95 % interval   "
          f"{'best: ref':>9} {'this':>7} {'this/ref':>9}")
    worst = 0.0
    for case in cases:
        a, b = samples[(args.ref, case)], samples[("this checkout", case)]
        ma, mb = statistics.median(a) / 1000, statistics.median(b) / 1000
        low, high = bootstrap_ratio(a, b, rng)
        worst = max(worst, abs(mb / ma - 1))
        # The fastest batch of each: what a request costs when nothing else got in the way.
        ba, bb = min(a) / 1000, min(b) / 1000
        print(f"{case:<32} {ma:>12.1f} {mb:>8.1f} {mb / ma:>8.3f}×  {low:.3f}–{high:.3f}   "
              f"{ba:>9.1f} {bb:>7.1f} {bb / ba:>8.3f}×")
    print(f"\nlargest change of a median: {worst * 100:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
