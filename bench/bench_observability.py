#!/usr/bin/env python
"""What request ids and metrics add to a request, paired and robust to a busy machine.

``bench_auth.py``'s "limits + usage" row against "limits + usage, no metrics" compares
medians, which other processes on a shared machine move by more than the few µs measured
here. This script times the same apps (``bench_auth.limits_usage_app`` as deployed,
``limits_usage_bare_app`` without ``api/instrument.py``, and the deployed app with its
metrics switched off) in interleaved, shuffled batches, and compares low percentiles of the
batch times: the batches that no other process disturbed.

    python bench/bench_observability.py [--rounds 600] [--batch 100]
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_auth as B  # noqa: E402

TARGET_US = B.TARGET_METRICS_US


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    fixture = B.sqlite_fixture(1000)
    instance = Path(tempfile.mkdtemp(prefix="keygate-bench-obs-"))
    apps = {"without": B.limits_usage_bare_app(fixture, instance / "a"),
            "metrics off": B.limits_usage_app(fixture, instance / "b"),
            "as deployed": B.limits_usage_app(fixture, instance / "c")}
    apps["metrics off"].app.wsgi_app.metrics = None  # the middleware and the id, no counting
    try:
        cases = {name: B.Case(name, a.app.wsgi_app, "/secret", [B.api_key_header(fixture.keys[0])])
                 for name, a in apps.items()}
        for case in cases.values():
            B.check_case(case, fixture)
        times: dict[str, list[float]] = {name: [] for name in cases}
        order = list(cases.items())
        rng = random.Random(1)
        gc.collect()
        gc.disable()
        try:
            for _ in range(args.rounds):
                rng.shuffle(order)
                for name, case in order:
                    times[name].append(B.run_batch(case, case.next_batch(args.batch)) / args.batch / 1000)
        finally:
            gc.enable()
        points = {"fastest": 0.0, "p5": 0.05, "p10": 0.10, "p25": 0.25, "median": 0.5}

        def at(name: str, q: float) -> float:
            ordered = sorted(times[name])
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        print(f"GET /secret, repeated key, limits + usage on; {args.rounds} rounds x {args.batch} requests, "
              "µs per request")
        print(f"{'':>24}" + "".join(f"{p:>9}" for p in points))
        for name in cases:
            print(f"{name:>24}" + "".join(f"{at(name, q):9.1f}" for q in points.values()))
        added = {p: at("as deployed", q) - at("without", q) for p, q in points.items()}
        print(f"{'added':>24}" + "".join(f"{v:+9.1f}" for v in added.values()))
        print(f"{'of which the metrics':>24}" + "".join(
            f"{at('as deployed', q) - at('metrics off', q):+9.1f}" for q in points.values()))
        verdict = added["p10"] <= TARGET_US
        print(f"added at the 10th percentile {added['p10']:+.1f} µs, target ≤{TARGET_US:.0f} µs  "
              f"{'PASS' if verdict else 'FAIL'}")
        return 0 if verdict else 1
    finally:
        for bench_app in apps.values():
            bench_app.app.extensions["keygate.usage"].close()
            bench_app.auth.store.close()
        shutil.rmtree(instance, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
