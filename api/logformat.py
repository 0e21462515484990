"""``KEYGATE_LOG_FORMAT=json``: every log line one JSON object.

``{"time", "level", "logger", "event", ...}``: ``event`` is the message (``"request"``
for the access log, whose records add ``request_id, method, route, path, status,
duration_ms, key_id, client, ...``); a line written while serving a request carries
its ``request_id``; an exception is one string member, so a traceback stays one line.
``json.dumps`` escapes every control and non-ASCII character: no value can break a line.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from keys.redact import redact

from .instrument import REQUEST_ID_KEY


def _current_request_id() -> str | None:
    from flask import has_request_context, request

    return request.environ.get(REQUEST_ID_KEY) if has_request_context() else None


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` to a record written while a request is being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _current_request_id()
        return True


#: One encoder for every line: ``json.dumps`` with options builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=True, default=str)


class JsonFormatter(logging.Formatter):
    """The time's second is formatted once per second, as ``CombinedFormatter`` does."""

    _second: tuple[int, str] = (-1, "")  # one attribute: threads never see half of an update

    def format(self, record: logging.LogRecord) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        data: dict[str, Any] = {
            "time": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if access is not None:
            data.update(access)  # redacted by the access log already
        else:
            request_id = getattr(record, "request_id", None)
            if request_id is not None:
                data["request_id"] = request_id
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        elif record.stack_info:
            data["stack"] = redact(self.formatStack(record.stack_info))
        return _ENCODER.encode(data)


def json_line(event: str, level: int = logging.INFO, logger: str = "keygate", **fields: Any) -> str:
    """One JSON log line written outside logging (the CLI's own notices under ``serve``)."""
    record = logging.makeLogRecord({"name": logger, "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": event, "args": None})
    text = JsonFormatter().format(record)
    return text if not fields else json.dumps({**json.loads(text), **fields})
