"""The key lifecycle shared by the CLI and the admin API: issue, revoke, rotate.

Each change is written together with its audit event, in one transaction.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterable
from typing import NamedTuple

from .exc import Conflict, InvalidCredentials, NotFound
from .keyformat import generate_key, hash_key, is_key_id
from .model import AuditEvent, KeyRecord
from .parse import parse_name, parse_networks, parse_rate_limit
from .scopes import parse_scopes
from .store.base import KeyStore
from .verify import match_key


class IssuedKey(NamedTuple):
    """A freshly stored key and its plaintext: the only time the plaintext exists."""

    plaintext: str
    record: KeyRecord


def cli_actor() -> str:
    """``cli:<os user>``: who acted when the change came from ``manage.py``."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "unknown"
    return f"cli:{user}"


def issue_key(
    store: KeyStore,
    *,
    name: object,
    scopes: Iterable[str],
    expires_in: int | None = None,
    rate_limit: str | None = None,
    allowed_ips: Iterable[str] = (),
    actor: str | None = None,
    now: float | None = None,
) -> IssuedKey:
    """Validate, generate and store a key. The plaintext is returned only after
    the store has durably committed it, so a key that was shown is a key that works."""
    now = time.time() if now is None else now
    canonical_rate = None if rate_limit is None else str(parse_rate_limit(rate_limit))
    key = generate_key()
    record = KeyRecord(
        id=key.key_id,
        name=parse_name(name),
        key_hash=hash_key(key.plaintext),
        scopes=parse_scopes(scopes),
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        rate_limit=canonical_rate,
        allowed_ips=parse_networks(allowed_ips),
    )
    event = AuditEvent("create", record.id, actor or cli_actor(), now,
                       {"name": record.name, "scopes": list(record.scopes)})
    store.add(record, event)
    return IssuedKey(key.plaintext, record)


def get_key(store: KeyStore, key_id: str) -> KeyRecord:
    record = store.get(key_id) if is_key_id(key_id) else None
    if record is None:
        raise NotFound(f"no key with id {key_id[:40]!r}")
    return record


def revoke_key(store: KeyStore, key_id: str, *, actor: str | None = None,
               now: float | None = None) -> KeyRecord:
    """Revoke now; revoking twice is harmless and keeps the first time."""
    now = time.time() if now is None else now
    before = get_key(store, key_id)
    if before.revoked_at is not None and before.revoked_at <= now:
        return before  # already revoked: nothing changes, nothing to audit
    event = AuditEvent("revoke", key_id, actor or cli_actor(), now)
    record = store.revoke(key_id, now, event)
    if record is None:
        raise NotFound(f"no key with id {key_id[:40]!r}")
    return record


def rotate_key(store: KeyStore, key_id: str, *, grace: int | None = None,
               actor: str | None = None, now: float | None = None) -> IssuedKey:
    """A new key with the old one's name, scopes, expiry, limit and allow-list.

    The old key stops now, or at the end of ``grace`` seconds; its query tokens
    stop now either way (its generation is bumped).
    """
    now = time.time() if now is None else now
    old = get_key(store, key_id)
    if old.revoked_at is not None:
        raise Conflict(f"key {key_id} is already revoked or rotated; rotate its replacement instead")
    if old.expires_at is not None and old.expires_at <= now:
        raise Conflict(f"key {key_id} has expired; create a new key instead")
    key = generate_key()
    new = old.replace(
        id=key.key_id, key_hash=hash_key(key.plaintext), created_at=now, revoked_at=None,
        last_used_at=None, use_count=0, replaces=old.id, generation=0,
    )
    stops_at = now + (grace or 0)
    actor = actor or cli_actor()
    events = [
        AuditEvent("rotate", old.id, actor, now, {"new_key_id": new.id, "grace_seconds": grace or 0}),
        # The new key's own history starts with where it came from.
        AuditEvent("create", new.id, actor, now,
                   {"name": new.name, "scopes": list(new.scopes), "replaces": old.id}),
    ]
    if store.rotate(new, old.id, stops_at, events) is None:
        raise NotFound(f"no key with id {key_id[:40]!r}")
    return IssuedKey(key.plaintext, new)


def find_by_plaintext(store: KeyStore, plaintext: str) -> KeyRecord:
    """The stored key a (leaked) plaintext belongs to, even if it no longer works."""
    try:
        return match_key(store, plaintext)
    except InvalidCredentials:
        raise NotFound("that value is not a key in this store") from None
