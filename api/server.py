"""``manage.py serve``: gunicorn, with an access log that never records a credential."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from keys.redact import REDACTED, redact, redact_query

_SECRET_HEADERS = {"{api-key}i", "{authorization}i", "{cookie}i"}


class _RedactFilter(logging.Filter):
    """Scrubs gunicorn's error-log messages, which quote request lines and URIs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


class RedactingLogger(Logger):
    """gunicorn's logger with tokens and keys scrubbed from every access-log atom
    and every error-log message."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        if not any(isinstance(f, _RedactFilter) for f in self.error_log.filters):
            self.error_log.addFilter(_RedactFilter())

    def atoms(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> dict[str, Any]:
        atoms = super().atoms(resp, req, environ, request_time)
        atoms["r"] = redact(atoms["r"])
        atoms["q"] = redact_query(atoms["q"] or "")
        atoms["f"] = redact(atoms["f"])
        atoms["{referer}i"] = atoms["f"]
        for name in _SECRET_HEADERS & atoms.keys():
            atoms[name] = REDACTED
        for name in [k for k in atoms if k.endswith("}e")]:
            del atoms[name]  # environ copies of the above
        return atoms


class KeygateServer(BaseApplication):
    """Runs ``api:create_app()`` in gunicorn worker processes (no preload: each
    worker opens its own store connections)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from api import create_app

        return create_app()


def _flush_on_exit(_server: Any, worker: Any) -> None:
    """Write the worker's batched usage counters before it exits (clean shutdown)."""
    app = getattr(worker, "wsgi", None)
    usage = getattr(app, "extensions", {}).get("keygate.usage")
    if usage is not None:
        usage.close()


def serve(host: str, port: int, workers: int) -> None:
    KeygateServer(
        {
            "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "workers": workers,
            "worker_class": "sync",
            "accesslog": "-",
            "logger_class": RedactingLogger,
            # An 8 KB header must reach the app (and get a 401), not gunicorn's bare 400.
            "limit_request_field_size": 16384,
            "graceful_timeout": 10,
            "proc_name": "keygate",
            "worker_exit": _flush_on_exit,
            # gunicorn's control socket is one per user (~/.gunicorn); two servers would clash.
            "control_socket_disable": True,
        }
    ).run()
