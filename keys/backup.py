"""Export and import: every key (metadata and hash) as JSON lines, for backups and for
moving from one store to another (the SQLite laptop to the PostgreSQL fleet).

The format names its fields itself, so it outlives any table layout::

    {"format": "keygate-export", "version": 1, "exported_at": "2026-05-01T10:00:00Z"}
    {"type": "key", "id": "Xk3v9QpL2mZa", "name": "billing", "key_hash": "…", ...}
    {"type": "event", "at": 1777629600.0, "event": "create", "key_id": "Xk3v9QpL2mZa", ...}
    {"type": "auth_failures", "counts": {"invalid_credentials": 3}}

Keys first, then (with ``audit``) the audit events oldest first and the failure counts.
There is never a plaintext key in it: the store has none. Times are epoch seconds, so
a key's expiry and revocation come back to the microsecond.

An import reads the file once to check every line (a bad one is named by its number,
and nothing is written), then loads it into an empty store in one transaction.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .exc import InvalidRequest
from .keyformat import is_key_id
from .model import AuditEvent, KeyRecord, isoformat
from .parse import parse_name, parse_networks, parse_rate_limit
from .scopes import Scopes
from .store.base import KeyStore

FORMAT = "keygate-export"
VERSION = 1
MAX_LINE = 256 * 1024  # characters; a key's line is under 2 KiB, an event's detail small
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_KEY_FIELDS = ("id", "name", "key_hash", "scopes", "created_at", "expires_at", "revoked_at",
               "last_used_at", "use_count", "rate_limit", "allowed_ips", "replaces", "generation")
_EVENT_FIELDS = ("at", "event", "key_id", "actor", "detail")


class Imported(NamedTuple):
    keys: int
    events: int


# -- writing ------------------------------------------------------------------------------


def export_lines(store: KeyStore, *, audit: bool = False, page: int = 1000) -> Iterator[str]:
    """The store as JSON lines (no newlines included), keys streamed a page at a time."""
    yield json.dumps({"format": FORMAT, "version": VERSION, "exported_at": isoformat(time.time())})
    after = None
    while batch := store.list_keys(limit=page, after=after):
        for record in batch:
            yield json.dumps({"type": "key", **{f: _plain(getattr(record, f)) for f in _KEY_FIELDS}})
        after = batch[-1].id
    if not audit:
        return
    events: list[AuditEvent] = []  # the store pages newest first; the file reads oldest first
    before = None
    while batch_events := store.events(limit=page, before=before):
        events.extend(batch_events)
        before = batch_events[-1].id
        if before is None:  # a store without event ids has only the one page
            break
    for event in reversed(events):
        yield json.dumps({"type": "event", **{f: getattr(event, f) for f in _EVENT_FIELDS}})
    yield json.dumps({"type": "auth_failures", "counts": store.auth_failures()})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# -- reading ------------------------------------------------------------------------------


def _number(line: dict[str, Any], name: str, *, optional: bool = False, whole: bool = False) -> Any:
    value = line[name]
    if value is None and optional:
        return None
    kinds: tuple[type[int] | type[float], ...] = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a {'whole ' if whole else ''}number of at least 0"
                         f"{' or null' if optional else ''}")
    return value if whole else float(value)


def _string_or_none(line: dict[str, Any], name: str) -> str | None:
    value = line[name]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null")
    return value


def _strings(line: dict[str, Any], name: str) -> list[str]:
    value = line[name]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return value


def _fields(line: dict[str, Any], expected: tuple[str, ...]) -> None:
    missing = [f for f in expected if f not in line]
    extra = sorted(set(line) - set(expected) - {"type"})
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if extra:
        raise ValueError(f"unknown field {extra[0][:40]!r}")


def _record(line: dict[str, Any], vocabulary: Scopes) -> KeyRecord:
    _fields(line, _KEY_FIELDS)
    key_id, replaces = line["id"], _string_or_none(line, "replaces")
    if not isinstance(key_id, str) or not is_key_id(key_id):
        raise ValueError("id is not a key id")
    if replaces is not None and not is_key_id(replaces):
        raise ValueError("replaces is not a key id")
    if not isinstance(line["key_hash"], str) or not _HASH_RE.fullmatch(line["key_hash"]):
        raise ValueError("key_hash must be 64 lower-case hex digits (a SHA-256)")
    rate = _string_or_none(line, "rate_limit")
    try:
        return KeyRecord(
            id=key_id, name=parse_name(line["name"]), key_hash=line["key_hash"],
            scopes=vocabulary.parse(_strings(line, "scopes")),
            created_at=_number(line, "created_at"),
            expires_at=_number(line, "expires_at", optional=True),
            revoked_at=_number(line, "revoked_at", optional=True),
            last_used_at=_number(line, "last_used_at", optional=True),
            use_count=_number(line, "use_count", whole=True),
            rate_limit=None if rate is None else str(parse_rate_limit(rate)),
            allowed_ips=parse_networks(_strings(line, "allowed_ips")),
            replaces=replaces,
            generation=_number(line, "generation", whole=True),
        )
    except InvalidRequest as e:
        raise ValueError(e.detail) from None


def _event(line: dict[str, Any]) -> AuditEvent:
    _fields(line, _EVENT_FIELDS)
    for name, longest in (("event", 32), ("key_id", 16), ("actor", 120)):  # the audit table's widths
        if not isinstance(line[name], str) or not 0 < len(line[name]) <= longest:
            raise ValueError(f"{name} must be a string of 1-{longest} characters")
    if not isinstance(line["detail"], dict):
        raise ValueError("detail must be an object")
    return AuditEvent(event=line["event"], key_id=line["key_id"], actor=line["actor"],
                      at=_number(line, "at"), detail=line["detail"])


def _failures(line: dict[str, Any]) -> dict[str, int]:
    _fields(line, ("counts",))
    counts = line["counts"]
    if not isinstance(counts, dict) or not all(
            isinstance(k, str) and 0 < len(k) <= 40 and isinstance(v, int) and not isinstance(v, bool)
            and v >= 0 for k, v in counts.items()):
        raise ValueError("counts must map codes to whole numbers")
    return counts


_READERS: dict[str, Callable[[dict[str, Any]], Any]] = {"event": _event, "auth_failures": _failures}


def _entries(path: Path, vocabulary: Scopes) -> Iterator[tuple[str, Any]]:
    """(type, parsed value) for every line after the header; ``InvalidRequest`` naming the
    line for the first one that is not what an export writes."""
    if not path.is_file():  # /dev/zero would be read forever; a pipe can't be read twice
        raise InvalidRequest(f"{path.name}: not a regular file")
    with path.open(encoding="utf-8", errors="strict") as f:
        number = 0
        try:
            while text := f.readline(MAX_LINE + 1):
                number += 1
                if len(text) > MAX_LINE:
                    raise ValueError(f"longer than {MAX_LINE // 1024} KiB; not a line an export writes")
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except ValueError:
                    raise ValueError("not a JSON object") from None
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
                if number == 1:
                    if line.get("format") != FORMAT:
                        raise ValueError("not a keygate export (its first line names the format)")
                    if line.get("version") != VERSION:
                        raise ValueError(f"export format version {str(line.get('version'))[:10]!r}; "
                                         f"this keygate reads version {VERSION}")
                    continue
                kind = line.get("type")
                if kind == "key":
                    yield kind, _record(line, vocabulary)
                    continue
                reader = _READERS.get(kind) if isinstance(kind, str) else None
                if reader is None:
                    raise ValueError(f"unknown line type {str(kind)[:40]!r}")
                yield str(kind), reader(line)
        except UnicodeDecodeError:
            raise InvalidRequest(f"{path.name}: line {number + 1}: not UTF-8 text") from None
        except ValueError as e:
            raise InvalidRequest(f"{path.name}: line {number}: {e}") from None
        if number == 0:
            raise InvalidRequest(f"{path.name}: empty; not a keygate export")


def check_export(path: Path, scopes: Scopes | None = None) -> Imported:
    """Read every line of an export; ``InvalidRequest`` for the first bad one. Keys' scopes
    must be in the app's vocabulary ``scopes`` (default: any well-formed scope)."""
    vocabulary = Scopes.coerce(scopes)
    seen: set[str] = set()
    keys = events = 0
    for kind, value in _entries(path, vocabulary):
        if kind == "key":
            if value.id in seen:
                raise InvalidRequest(f"{path.name}: key {value.id} appears twice")
            seen.add(value.id)
            keys += 1
        elif kind == "event":
            events += 1
    return Imported(keys, events)


def import_export(store: KeyStore, path: Path, checked: Imported | None = None,
                  scopes: Scopes | None = None) -> Imported:
    """Load an export into ``store``, which must hold no key (else ``InvalidRequest``);
    all or nothing. ``checked``: what ``check_export`` already said of the file."""
    vocabulary = Scopes.coerce(scopes)
    counts = checked or check_export(path, vocabulary)

    def only(kind: str) -> Iterable[Any]:
        return (value for k, value in _entries(path, vocabulary) if k == kind)

    failures: dict[str, int] = {}
    for counted in only("auth_failures"):
        for code, n in counted.items():
            failures[code] = failures.get(code, 0) + n
    store.load(only("key"), only("event"), failures)
    return counts
