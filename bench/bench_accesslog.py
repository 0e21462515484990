#!/usr/bin/env python
"""What the access log adds to a request, as keygate's server runs the app, in one run.

The deployed app (``create_app`` on a SQLite store, ``GET /secret`` with a key whose limit
is never reached) behind ``api.accesslog.AccessLog``, with the server's own logging
configuration (``api.server.logging_config``; the access handler writes to /dev/null),
three ways, in interleaved batches:

* ``off``: the access logger above INFO: nothing noted, nothing written (the baseline);
* ``one by one``: ``BATCH = 1``, each request builds and formats its own record as it
  ends, which is what keygate did before records were written in runs;
* ``in runs``: as deployed (``BATCH = 64``): a request notes a tuple, and every 64th
  builds, redacts and formats the run's records together.

For ``text`` and ``json`` (``KEYGATE_LOG_FORMAT``). Prints the median µs of CPU per request
of each, what each log adds above ``off``, and ``in runs`` ÷ ``one by one`` of that.

    python bench/bench_accesslog.py [--rounds 30] [--batch 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import logging.config
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    instance = Path(tempfile.mkdtemp(prefix="keygate-bench-accesslog-"))
    env = {**os.environ, "KEYGATE_INSTANCE_PATH": str(instance),
           "KEYGATE_DATABASE_URL": f"sqlite:///{instance / 'keygate.db'}",
           "KEYGATE_DEFAULT_RATE_LIMIT": "100000000/minute"}
    os.environ.update(env)

    def cli(*argv: str) -> str:
        return subprocess.run([sys.executable, str(ROOT / "manage.py"), *argv], env=env, check=True,
                              capture_output=True, text=True).stdout

    cli("init", "--no-admin-key")
    key = json.loads(cli("create-key", "--name", "bench", "--scope", "secret:read", "--json"))["key"]

    from api import create_app
    from api.accesslog import AccessLog
    from api.server import logging_config

    logging._srcfile = None  # type: ignore[attr-defined]  # as load_worker_app sets it
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    app = create_app()
    access = logging.getLogger("keygate.access")

    def environ() -> dict[str, Any]:
        return {"REQUEST_METHOD": "GET", "PATH_INFO": "/secret", "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
                "SERVER_PORT": "5000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
                "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
                "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
                "wsgi.version": (1, 0), "HTTP_HOST": "127.0.0.1:5000", "HTTP_API_KEY": key,
                "HTTP_USER_AGENT": "wrk/4.1.0", "SCRIPT_NAME": ""}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        assert status.startswith("200"), status

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {args.rounds} rounds of "
          f"{args.batch} requests per variant; CPU µs per request, medians")
    for fmt in ("text", "json"):
        config = logging_config(fmt)
        config["handlers"]["access"]["stream"] = open(os.devnull, "w")  # noqa: SIM115
        logging.config.dictConfig(config)
        one_by_one, in_runs = AccessLog(app), AccessLog(app)
        one_by_one.BATCH = 1
        variants = {"off": (in_runs, logging.WARNING), "one by one": (one_by_one, logging.INFO),
                    "in runs": (in_runs, logging.INFO)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds + 2):  # the first two warm up
            for name, (wsgi, level) in variants.items():
                access.setLevel(level)
                started = time.process_time()
                for _ in range(args.batch):
                    b"".join(wsgi(environ(), start_response))
                wsgi.write_pending()
                if round_ >= 2:
                    times[name].append((time.process_time() - started) / args.batch * 1e6)
        med = {name: statistics.median(t) for name, t in times.items()}
        added = {name: med[name] - med["off"] for name in ("one by one", "in runs")}
        print(f"\n{fmt}:")
        for name, m in med.items():
            extra = f"   access log +{added[name]:5.1f} µs" if name in added else ""
            print(f"  {name:12s} {m:7.1f} µs{extra}")
        ratio = added["in runs"] / added["one by one"] if added["one by one"] > 0 else float("nan")
        print(f"  in runs ÷ one by one (what the log adds): {ratio:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
