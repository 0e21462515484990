"""A process-local store: for tests and for trying keygate without a database."""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..exc import InvalidRequest
from ..model import AuditEvent, KeyFilter, KeyRecord, SessionRecord, UsageBucket
from .base import SCHEMA_VERSION, KeyStore, Merge


class MemoryKeyStore(KeyStore):
    backend = "memory"

    def __init__(self) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._ids: list[str] = []  # sorted, for paging
        self._events: list[AuditEvent] = []
        self._next_event_id = 1
        self._summaries: dict[tuple[str, str, str, int], int] = {}  # -> the summary event's id
        self._failures: Counter[str] = Counter()
        self._hourly: dict[tuple[str, int], list[int]] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self._revision = 0
        self._lock = threading.Lock()

    def migrate(self) -> int:
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        return SCHEMA_VERSION

    def _append_event(self, event: AuditEvent | None) -> int:
        if event is None:
            return 0
        event_id, self._next_event_id = self._next_event_id, self._next_event_id + 1
        self._events.append(dataclasses.replace(event, id=event_id))
        return event_id

    def _insert(self, record: KeyRecord) -> None:
        if record.id in self._keys:
            raise ValueError(f"key id {record.id} already exists")
        self._keys[record.id] = record
        bisect.insort(self._ids, record.id)

    def _revoke(self, key_id: str, at: float) -> KeyRecord:
        record = self._keys[key_id]
        if record.revoked_at is None or record.revoked_at > at:
            record = record.replace(revoked_at=at, generation=record.generation + 1)
            self._keys[key_id] = record
            self._revision += 1
        return record

    def add(self, record: KeyRecord, event: AuditEvent | None = None) -> None:
        with self._lock:
            self._insert(record)
            self._append_event(event)

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def list_keys(self, *, limit: int | None = None, after: str | None = None,
                  where: KeyFilter | None = None) -> list[KeyRecord]:
        with self._lock:
            start = bisect.bisect_right(self._ids, after) if after is not None else 0
            if where is None:
                stop = None if limit is None else start + limit
                return [self._keys[i] for i in self._ids[start:stop]]
            out = []
            for key_id in self._ids[start:]:
                if where.matches(self._keys[key_id]):
                    out.append(self._keys[key_id])
                    if limit is not None and len(out) >= limit:
                        break
            return out

    def revoke(self, key_id: str, at: float, event: AuditEvent | None = None) -> KeyRecord | None:
        with self._lock:
            if key_id not in self._keys:
                return None
            record = self._revoke(key_id, at)
            self._append_event(event)
            return record

    def rotate(
        self, new: KeyRecord, old_id: str, old_revoked_at: float, events: Sequence[AuditEvent] = ()
    ) -> KeyRecord | None:
        with self._lock:
            if old_id not in self._keys:
                return None
            self._insert(new)
            record = self._revoke(old_id, old_revoked_at)
            for event in events:
                self._append_event(event)
            return record

    def update(self, key_id: str, changes: Mapping[str, Any], event: AuditEvent | None = None,
               *, bump_generation: bool = False) -> KeyRecord | None:
        with self._lock:
            record = self._keys.get(key_id)
            if record is None or record.revoked_at is not None:
                return None
            if bump_generation:
                changes = {**changes, "generation": record.generation + 1}
            record = self._keys[key_id] = record.replace(**changes)
            self._revision += 1
            self._append_event(event)
            return record

    def revision(self) -> int:
        return self._revision

    def count(self) -> int:
        return len(self._keys)

    def key_states(self, now: float, expiring_by: float) -> dict[str, int]:
        counts = dict.fromkeys(("active", "grace", "revoked", "expired", "expiring"), 0)
        with self._lock:
            records = list(self._keys.values())
        for record in records:
            state = record.state(now)
            counts[state] += 1
            if state in ("active", "grace") and record.expires_at is not None \
                    and record.expires_at <= expiring_by:
                counts["expiring"] += 1
        return counts

    def load(self, records: Iterable[KeyRecord], events: Iterable[AuditEvent] = (),
             auth_failures: Mapping[str, int] | None = None) -> int:
        records = list(records)
        with self._lock:
            if self._keys:
                raise InvalidRequest(f"the store already holds {len(self._keys)} keys; "
                                     "import loads into an empty store only")
            ids = [r.id for r in records]
            if len(set(ids)) != len(ids):
                raise InvalidRequest("the same key id appears twice")
            for record in records:
                self._insert(record)
            for event in events:
                self._append_event(event)
            self._failures.update(auth_failures or {})
        return len(records)

    def record_event(self, event: AuditEvent) -> None:
        with self._lock:
            self._append_event(event)

    def summarize(self, event: AuditEvent, period: int, merge: Merge) -> None:
        group = (event.key_id, event.event, event.actor, period)
        with self._lock:
            event_id = self._summaries.get(group)
            at = self._event_index(event_id) if event_id is not None else None
            if at is None:
                self._summaries[group] = self._append_event(
                    dataclasses.replace(event, detail=merge(None, event.detail)))
            else:
                summary = self._events[at]
                self._events[at] = dataclasses.replace(summary, detail=merge(summary.detail, event.detail))

    def _event_index(self, event_id: int) -> int | None:
        i = bisect.bisect_left(self._events, event_id, key=lambda e: e.id or 0)  # ids only grow; stored events have one
        return i if i < len(self._events) and self._events[i].id == event_id else None

    def prune_events(self, before: float, batch: int = 1000) -> int:
        with self._lock:
            doomed = [i for i, e in enumerate(self._events) if e.at < before][:batch]
            for i in reversed(doomed):
                del self._events[i]
            return len(doomed)

    def events(
        self, *, key_id: str | None = None, limit: int = 100, before: int | None = None,
        event: str | None = None,
    ) -> list[AuditEvent]:
        with self._lock:
            out = []
            for e in reversed(self._events):
                if before is not None and e.id is not None and e.id >= before:
                    continue
                if (key_id is None or e.key_id == key_id) and (event is None or e.event == event):
                    out.append(e)
                    if len(out) >= limit:
                        break
            return out

    def record_usage(self, usage: Mapping[str, tuple[float, int]],
                     hourly: Mapping[tuple[str, int], tuple[int, int, int]] | None = None) -> None:
        with self._lock:
            for bucket, counts in (hourly or {}).items():
                row = self._hourly.setdefault(bucket, [0, 0, 0])
                for i, n in enumerate(counts):
                    row[i] += n
            for key_id, (last_used, count) in usage.items():
                record = self._keys.get(key_id)
                if record is not None:
                    newest = max(last_used, record.last_used_at or 0.0)
                    self._keys[key_id] = record.replace(
                        last_used_at=newest, use_count=record.use_count + count
                    )

    def usage(self, key_id: str, since: float, until: float) -> list[UsageBucket]:
        with self._lock:
            return [UsageBucket(float(hour), *counts) for (kid, hour), counts in sorted(self._hourly.items())
                    if kid == key_id and since <= hour < until]

    def purge_usage(self, before: float) -> int:
        with self._lock:
            old = [bucket for bucket in self._hourly if bucket[1] < before]
            for bucket in old:
                del self._hourly[bucket]
            return len(old)

    def add_auth_failures(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._failures.update(counts)

    def auth_failures(self) -> dict[str, int]:
        with self._lock:
            return dict(self._failures)

    def add_session(self, session: SessionRecord) -> None:
        with self._lock:
            self._sessions[session.id_hash] = session

    def get_session(self, id_hash: str) -> SessionRecord | None:
        return self._sessions.get(id_hash)

    def touch_session(self, id_hash: str, at: float) -> None:
        with self._lock:
            session = self._sessions.get(id_hash)
            if session is not None:
                self._sessions[id_hash] = session._replace(last_seen_at=max(at, session.last_seen_at))

    def delete_session(self, id_hash: str) -> None:
        with self._lock:
            self._sessions.pop(id_hash, None)

    def purge_sessions(self, idle_before: float, created_before: float) -> int:
        with self._lock:
            old = [h for h, s in self._sessions.items()
                   if s.last_seen_at < idle_before or s.created_at < created_before]
            for h in old:
                del self._sessions[h]
            return len(old)
