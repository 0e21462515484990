"""The key store interface: small on purpose, so a backend is an afternoon's work."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..model import AuditEvent, KeyFilter, KeyRecord, SessionRecord, UsageBucket

#: Schema version this code reads and writes; ``migrate()`` brings a store to it.
SCHEMA_VERSION = 6

#: ``merge(summary detail so far, or None for the first, one occurrence's detail) -> detail``
Merge = Callable[[dict[str, Any] | None, dict[str, Any]], dict[str, Any]]


class KeyStore(ABC):
    """Where keys live. Every method is safe to call from several threads.

    ``get`` is on the hot path of every request and must cost microseconds;
    the rest runs when keys are managed. Each write that takes an ``event``
    stores it in the same transaction, so the audit trail can't miss a change.
    """

    #: Short name of the backend, for logs and the CLI ("memory", "sqlite", ...).
    backend: str = "abstract"

    @abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent. Returns the version reached."""

    @abstractmethod
    def schema_version(self) -> int:
        """The version the store is at now (0 when it was never initialised)."""

    @abstractmethod
    def add(self, record: KeyRecord, event: AuditEvent | None = None) -> None:
        """Store a new key. The write is durable when this returns."""

    @abstractmethod
    def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id, or ``None``."""

    @abstractmethod
    def list_keys(self, *, limit: int | None = None, after: str | None = None,
                  where: KeyFilter | None = None) -> list[KeyRecord]:
        """Keys ordered by id; ``after`` is the last id of the previous page; ``where``
        keeps only the keys it matches."""

    @abstractmethod
    def revoke(self, key_id: str, at: float, event: AuditEvent | None = None) -> KeyRecord | None:
        """Revoke at ``at`` (kept if already revoked earlier) and bump the key's
        generation, killing its tokens; ``None`` if unknown."""

    @abstractmethod
    def rotate(
        self, new: KeyRecord, old_id: str, old_revoked_at: float, events: Sequence[AuditEvent] = ()
    ) -> KeyRecord | None:
        """Atomically add ``new``, revoke ``old_id`` at ``old_revoked_at`` (as ``revoke``
        does) and append ``events``. Returns the old key's updated record, ``None`` if
        unknown (then nothing is written)."""

    @abstractmethod
    def update(self, key_id: str, changes: Mapping[str, Any], event: AuditEvent | None = None,
               *, bump_generation: bool = False) -> KeyRecord | None:
        """Change a key that is not revoked (not even in a rotation's grace) in place:
        ``changes`` maps ``KeyRecord`` fields (name, scopes, rate_limit, allowed_ips,
        expires_at) to new values. Bumps the revision, so every verification cache lets
        go of the old record, and with ``bump_generation`` the key's generation (its query
        tokens die). Returns the new record; ``None`` when the key is unknown or revoked
        (then nothing is written)."""

    @abstractmethod
    def revision(self) -> int:
        """A counter that grows with every revocation or rotation: a cache of key
        records is current while the revision it was filled under still holds."""

    @abstractmethod
    def count(self) -> int:
        """How many keys are stored, revoked ones included."""

    @abstractmethod
    def key_states(self, now: float, expiring_by: float) -> dict[str, int]:
        """How many keys are ``active``, ``grace``, ``revoked`` and ``expired`` at ``now``,
        and (``expiring``) how many of the live ones expire by ``expiring_by``: one
        aggregate read for the metrics, never a record per key."""

    @abstractmethod
    def load(self, records: Iterable[KeyRecord], events: Iterable[AuditEvent] = (),
             auth_failures: Mapping[str, int] | None = None) -> int:
        """Fill an empty store (an import) in one transaction: records as they are, events
        in the order given (they get new ids), failure counts. Raises ``InvalidRequest``
        and writes nothing if the store already holds a key. Returns the keys written."""

    # -- audit trail ----------------------------------------------------------

    @abstractmethod
    def record_event(self, event: AuditEvent) -> None:
        """Append an event that goes with no key change (a token minted)."""

    def summarize(self, event: AuditEvent, period: int, merge: Merge) -> None:
        """Fold one occurrence of a frequent event (a token minted) into the one row kept per
        key, actor, event name and ``period``: ``merge(detail so far or None, event.detail)``
        gives the row's new detail. The row keeps the first occurrence's ``at``.

        The default appends a row per occurrence; the bundled stores keep one."""
        self.record_event(dataclasses.replace(event, detail=merge(None, event.detail)))

    def prune_events(self, before: float, batch: int = 1000) -> int:
        """Delete up to ``batch`` events older than ``before`` (epoch seconds), oldest first;
        returns how many went. Small batches, so a prune never holds the store for long.
        The default keeps everything."""
        return 0

    @abstractmethod
    def events(
        self, *, key_id: str | None = None, limit: int = 100, before: int | None = None,
        event: str | None = None,
    ) -> list[AuditEvent]:
        """Events newest first; ``before`` is the smallest id of the previous page; ``key_id``
        and ``event`` keep only the events of that key and of that kind."""

    # -- counters written behind the request path -------------------------------

    @abstractmethod
    def record_usage(self, usage: Mapping[str, tuple[float, int]],
                     hourly: Mapping[tuple[str, int], tuple[int, int, int]] | None = None) -> None:
        """Apply batched usage in one transaction: ``{key_id: (last_used_at, requests since
        last flush)}``, and ``hourly`` counts added to what each hour already has:
        ``{(key_id, hour start): (accepted, refused by limit, refused by scope)}``."""

    @abstractmethod
    def usage(self, key_id: str, since: float, until: float) -> list[UsageBucket]:
        """The hours of ``key_id`` with any count, starting in ``[since, until)``, oldest first."""

    @abstractmethod
    def purge_usage(self, before: float) -> int:
        """Forget the hourly counts of hours that started before ``before``; how many went."""

    @abstractmethod
    def add_auth_failures(self, counts: Mapping[str, int]) -> None:
        """Add batched authentication-failure counts per outcome code."""

    @abstractmethod
    def auth_failures(self) -> dict[str, int]:
        """Total authentication failures per outcome code."""

    # -- console sessions -----------------------------------------------------------

    @abstractmethod
    def add_session(self, session: SessionRecord) -> None:
        """Store a new signed-in session."""

    @abstractmethod
    def get_session(self, id_hash: str) -> SessionRecord | None:
        """The session whose id hashes to ``id_hash``, or ``None``."""

    @abstractmethod
    def touch_session(self, id_hash: str, at: float) -> None:
        """Record that the session was used at ``at`` (its idle timeout starts again)."""

    @abstractmethod
    def delete_session(self, id_hash: str) -> None:
        """End a session; ending one that is gone is harmless."""

    @abstractmethod
    def purge_sessions(self, idle_before: float, created_before: float) -> int:
        """Delete sessions last seen before ``idle_before`` or created before
        ``created_before``; how many went."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
