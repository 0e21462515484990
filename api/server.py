"""``manage.py serve``: keygate on granian, a Rust HTTP server with a WSGI interface.

Chosen by measurement (``bench/bench_http.py``, ``bench/README.md``): gunicorn's sync
workers close every connection and block a worker on every idle or slow client;
granian keeps connections alive and holds idle and slow ones in its Rust event loop,
so a client costs a worker only while its request runs. Each worker process builds the
app itself (no preload: every worker opens its own store connections) and runs it on a
few Python threads.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing.util
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keys.redact import redact

from .accesslog import AccessLog, WSGIApp, flush_access_logs
from .metrics import clean_directory

#: Descriptors kept back from connections for the store, logs and the rate-limit table.
RESERVED_FDS = 256
#: Request line plus headers, bytes; beyond it, 431 from the server. An 8 KB API-Key
#: header still reaches the app (and gets its 401).
MAX_HEADER_BYTES = 32 * 1024
#: A client must send a whole request head within this many ms (slowloris), and an idle
#: keep-alive connection is closed after it.
HEADER_TIMEOUT_MS = 10_000
#: Seconds a worker gets to finish its requests and write its usage counters on shutdown.
SHUTDOWN_GRACE = 15
#: Environment variables scrubbed from each worker once the app has read them: granian
#: copies the process environment into every request's WSGI environ.
_SECRET_ENV_PREFIX = "KEYGATE_"


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1
    threads: int = 1  # Python threads per worker running requests (``config.default_threads``)
    certfile: Path | None = None
    keyfile: Path | None = None
    log_format: str = "text"
    #: The metrics directory of the workers' app (``<instance path>/metrics``): emptied
    #: before the workers start, so the counts start at zero with the server.
    metrics_dir: Path | None = None


class _RedactFilter(logging.Filter):
    """Scrubs the server's own messages too, in case one ever quotes a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args or "kg_" in str(record.msg) or "=" in str(record.msg):
            record.msg, record.args = redact(record.getMessage()), None
        return True


def logging_config(log_format: str = "text") -> dict[str, Any]:
    """One ``dictConfig`` for the server's processes: errors and notices with a time and a
    level on stderr, the access log (``keygate.access``) on stdout; under ``json``, every
    one of them a JSON object (``api.logformat``)."""
    if log_format == "json":
        formatters: dict[str, Any] = {"generic": {"()": "api.logformat.JsonFormatter"},
                                      "access": {"()": "api.logformat.JsonFormatter"}}
    else:
        formatters = {"generic": {"format": "%(asctime)s [%(levelname)s] %(name)s: %(message)s"},
                      "access": {"()": "api.accesslog.CombinedFormatter"}}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": _RedactFilter}, "request_id": {"()": "api.logformat.RequestIdFilter"}},
        "formatters": formatters,
        "handlers": {
            "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                        "formatter": "generic", "filters": ["redact", "request_id"]},
            "access": {"class": "api.accesslog.BatchedStreamHandler", "stream": "ext://sys.stdout",
                       "formatter": "access"},
        },
        "loggers": {
            "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "keygate": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "keygate.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["console"], "level": "WARNING"},
    }


def _import(target: str) -> Any:
    module, _, name = target.partition(":")
    obj: Any = __import__(module, fromlist=["_"])
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def load_worker_app(target: str) -> WSGIApp:
    """Run in each worker: build the app from its factory, arrange for it to be closed when
    the worker exits, and wrap it in the access log."""
    # The logging HOWTO's optimisations: no caller, thread or process lookups per record
    # (the formats above use none of them); the access log writes one record a request.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    _route_stray_output_to_logging()
    app = _import(target)()
    close = getattr(app, "extensions", {}).get("keygate.close")
    if close is not None:
        # granian's workers are multiprocessing processes, which end with os._exit(), past
        # atexit; multiprocessing's own finalizers still run once the worker has drained.
        multiprocessing.util.Finalize(None, close, exitpriority=10)
    for name in [n for n in os.environ if n.startswith(_SECRET_ENV_PREFIX)]:
        del os.environ[name]
    # What the app built at start-up lives as long as the worker: out of the collector's
    # sight, so the full collections that a request's garbage triggers don't walk it again.
    gc.collect()
    gc.freeze()
    access_log = AccessLog(app)
    # After the app's close. The finalizer holds the access log: granian lets go of the app
    # before finalizers run, and the worker's last requests must still be written.
    multiprocessing.util.Finalize(None, _write_access_log, args=(access_log,), exitpriority=1)
    return access_log


def _write_access_log(access_log: AccessLog) -> None:
    access_log.write_pending()
    flush_access_logs()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _hold_stops() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _release_stops() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _stop_at_once_until_serving() -> None:
    """In each forked worker: granian sets the worker's stop handler only once the app is
    built, and until then the worker runs the master's handler (inherited by fork), which
    stops nothing: a stop right after start cost the whole grace period. A worker that has
    served nothing has nothing to lose, so until granian takes over, a stop just exits.

    The stop signals are held across the fork (Python drops a signal that reaches a child
    before its after-fork handlers run), and released once this handler is in place."""
    try:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _exit_before_serving)
    finally:
        _release_stops()  # whatever happened: a worker whose stops stay held can't be stopped


def _exit_before_serving(signum: int, frame: Any) -> None:
    os._exit(0)  # nothing served, nothing to flush: skip the interpreter's teardown


def _route_stray_output_to_logging() -> None:
    """Warnings and uncaught exceptions in threads go through logging (redacted, and one
    JSON object under ``KEYGATE_LOG_FORMAT=json``) rather than raw onto stderr."""
    import threading

    logging.captureWarnings(True)

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("keygate").error("uncaught exception in thread %s",
                                           getattr(args.thread, "name", "?"),
                                           exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = hook


def connection_budget() -> int:
    """How many connections a worker accepts at once (granian's ``backpressure``).

    granian counts connections here, not requests: an idle keep-alive connection holds
    its share until the header timeout closes it. Requests are bounded by the threads
    anyway, so the budget is as many connections as the worker may hold descriptors for:
    the soft descriptor limit is raised to the hard one first, as servers do.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep what we were given
    limit = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(64, min(limit, 65536) - RESERVED_FDS)


def serve(options: ServeOptions, target: str = "api:create_app") -> None:
    """Serve the app that the factory ``target`` (``module:function``) builds, until SIGTERM
    or SIGINT; then every worker finishes its requests and closes its app."""
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, SSLProtocols
    from granian.http import HTTP1Settings, HTTP2Settings

    server = Granian(
        target,
        address=options.host,
        port=options.port,
        interface=Interfaces.WSGI,
        workers=options.workers,
        blocking_threads=options.threads,
        blocking_threads_idle_timeout=600,
        backpressure=connection_budget(),
        http=HTTPModes.auto,
        http1_settings=HTTP1Settings(header_read_timeout=HEADER_TIMEOUT_MS, keep_alive=True,
                                     max_buffer_size=MAX_HEADER_BYTES),
        http2_settings=HTTP2Settings(max_headers_size=MAX_HEADER_BYTES, max_concurrent_streams=100),
        websockets=False,
        log_dictconfig=logging_config(options.log_format),
        log_access=False,  # keygate's AccessLog writes it, redacted
        ssl_cert=options.certfile,
        ssl_key=options.keyfile,
        ssl_protocol_min=SSLProtocols.tls12,
        respawn_failed_workers=True,
        workers_kill_timeout=SHUTDOWN_GRACE,
    )
    if options.metrics_dir is not None:
        clean_directory(options.metrics_dir)  # here, in the master, before any worker starts
    os.register_at_fork(before=_hold_stops, after_in_parent=_release_stops,
                        after_in_child=_stop_at_once_until_serving)
    server.serve(target_loader=load_worker_app)
