"""The key lifecycle shared by the CLI, the admin API and the console: issue, edit, revoke, rotate.

Each change is written together with its audit event, in one transaction.
"""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from .exc import Conflict, InvalidCredentials, InvalidRequest, NotFound
from .keyformat import ID_LENGTH, PREFIX, generate_key, hash_key, is_key_id, looks_like_key
from .model import AuditEvent, KeyRecord, isoformat
from .parse import parse_name, parse_networks, parse_rate_limit
from .scopes import ANY_SCOPE, Scopes
from .store.base import KeyStore
from .verify import match_key


class IssuedKey(NamedTuple):
    """A freshly stored key and its plaintext: the only time the plaintext exists."""

    plaintext: str
    record: KeyRecord


def cli_actor() -> str:
    """``cli:<os user>``: who acted when the change came from a command line (the default actor)."""
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
    vocabulary: Scopes = ANY_SCOPE,
) -> IssuedKey:
    """Validate, generate and store a key. The plaintext is returned only after
    the store has durably committed it, so a key that was shown is a key that works.

    ``vocabulary`` is the app's ``Scopes`` (``auth.scopes``); the default takes any
    well-formed scope names."""
    now = time.time() if now is None else now
    canonical_rate = None if rate_limit is None else str(parse_rate_limit(rate_limit))
    key = generate_key()
    record = KeyRecord(
        id=key.key_id,
        name=parse_name(name),
        key_hash=hash_key(key.plaintext),
        scopes=vocabulary.parse(scopes),
        created_at=now,
        expires_at=None if expires_in is None else now + expires_in,
        rate_limit=canonical_rate,
        allowed_ips=parse_networks(allowed_ips),
    )
    event = AuditEvent("create", record.id, actor or cli_actor(), now,
                       {"name": record.name, "scopes": list(record.scopes)})
    store.add(record, event)
    return IssuedKey(key.plaintext, record)


def not_a_key_id(value: str) -> str:
    """Why ``value`` is no key id, without echoing it: a pasted key (or anything else
    long) may hold a secret, and an answer or a terminal is no place for one."""
    value = value.strip()
    if value.startswith(PREFIX):
        what = "that is an API key" if looks_like_key(value) else "that looks like an API key"
        key_id = value[len(PREFIX):len(PREFIX) + ID_LENGTH]
        if is_key_id(key_id):
            return (f"{what}, not a key id: its id is {key_id} (the {ID_LENGTH} characters after "
                    f"{PREFIX}; the rest is the secret, never needed here)")
        return f"{what}, not a key id: a key's id is the {ID_LENGTH} characters after {PREFIX}"
    return f"not a key id: an id is {ID_LENGTH} letters and digits (the {ID_LENGTH} characters after {PREFIX})"


def get_key(store: KeyStore, key_id: str) -> KeyRecord:
    """The record of ``key_id``; ``NotFound`` naming the id, or saying why it is none."""
    if not is_key_id(key_id):
        raise NotFound(not_a_key_id(key_id))
    record = store.get(key_id)
    if record is None:
        raise NotFound(f"no key with id {key_id!r}")
    return record


#: What ``update_key`` may change; ``None`` means: no expiry, the default limit, anywhere.
EDITABLE = ("name", "scopes", "rate_limit", "allowed_ips", "expires_in")


def _edited(old: KeyRecord, edits: Mapping[str, Any], now: float, vocabulary: Scopes) -> dict[str, Any]:
    """The ``KeyRecord`` fields ``edits`` set, validated as ``issue_key`` validates them."""
    for name in sorted(set(edits) - set(EDITABLE)):
        raise InvalidRequest(f"unknown field {name[:40]!r}; editable: {', '.join(EDITABLE)}", field=name[:40])
    fields: dict[str, Any] = {}
    if "name" in edits:
        fields["name"] = parse_name(edits["name"])
    if "scopes" in edits:
        if edits["scopes"] is None:
            raise InvalidRequest("scopes: at least one scope is required", field="scopes")
        fields["scopes"] = vocabulary.parse(edits["scopes"])
    if "rate_limit" in edits:
        rate = edits["rate_limit"]
        fields["rate_limit"] = None if rate is None else str(parse_rate_limit(rate))
    if "allowed_ips" in edits:
        networks = edits["allowed_ips"]
        if isinstance(networks, (str, bytes)):
            raise InvalidRequest("allowed_ips must be a list of CIDR blocks", field="allowed_ips")
        fields["allowed_ips"] = parse_networks(networks or ())
    if "expires_in" in edits:
        expires_in = edits["expires_in"]
        if expires_in is not None and (isinstance(expires_in, bool) or not isinstance(expires_in, int)
                                       or expires_in <= 0):
            raise InvalidRequest("expires_in must be a positive whole number of seconds", field="expires_in")
        fields["expires_at"] = None if expires_in is None else now + expires_in
    return {name: value for name, value in fields.items() if getattr(old, name) != value}


def _shown(name: str, value: Any) -> Any:
    if name == "expires_at":
        return isoformat(value)
    return list(value) if isinstance(value, tuple) else value


def update_key(store: KeyStore, key_id: str, edits: Mapping[str, Any], *, actor: str | None = None,
               now: float | None = None, vocabulary: Scopes = ANY_SCOPE) -> KeyRecord:
    """Edit a key in place, without rotating it: any of ``EDITABLE`` (``expires_in`` in
    seconds from now). Validated as ``issue_key`` validates; a revoked key (or one in a
    rotation's grace) is a ``Conflict``. Audited as ``update`` with each changed field's old
    and new value; scopes narrowed also kill the key's query tokens (they may hold what the
    key no longer does). Nothing changed, nothing written."""
    now = time.time() if now is None else now
    old = get_key(store, key_id)
    fields = _edited(old, edits, now, vocabulary)
    if old.revoked_at is not None:
        raise Conflict(f"key {key_id} is revoked or rotated; it can't be edited"
                       + (" (edit its replacement)" if old.revoked_at > now else ""))
    if not fields:
        return old
    narrowed = "scopes" in fields and not all(vocabulary.grants(fields["scopes"], s) for s in old.scopes)
    changed = {name: {"from": _shown(name, getattr(old, name)), "to": _shown(name, value)}
               for name, value in fields.items()}
    event = AuditEvent("update", key_id, actor or cli_actor(), now, {"changed": changed})
    record = store.update(key_id, fields, event, bump_generation=narrowed)
    if record is None:  # revoked (or deleted) between the read and the write
        raise Conflict(f"key {key_id} is revoked or rotated; it can't be edited")
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
        raise NotFound(f"no key with id {key_id!r}")
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
        raise NotFound(f"no key with id {key_id!r}")
    return IssuedKey(key.plaintext, new)


def find_by_plaintext(store: KeyStore, plaintext: str) -> KeyRecord:
    """The stored key a (leaked) plaintext belongs to, even if it no longer works."""
    try:
        return match_key(store, plaintext)
    except InvalidCredentials:
        raise NotFound("that value is not a key in this store") from None
