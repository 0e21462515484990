"""Issuing and revoking keys: the lifecycle shared by the CLI and the admin API."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import NamedTuple

from .exc import InvalidCredentials, NotFound
from .keyformat import generate_key, hash_key, is_key_id
from .model import KeyRecord
from .parse import parse_name, parse_networks, parse_rate_limit
from .scopes import parse_scopes
from .store.base import KeyStore
from .verify import match_key


class IssuedKey(NamedTuple):
    """A freshly stored key and its plaintext: the only time the plaintext exists."""

    plaintext: str
    record: KeyRecord


def issue_key(
    store: KeyStore,
    *,
    name: object,
    scopes: Iterable[str],
    expires_in: int | None = None,
    rate_limit: str | None = None,
    allowed_ips: Iterable[str] = (),
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
    store.add(record)
    return IssuedKey(key.plaintext, record)


def get_key(store: KeyStore, key_id: str) -> KeyRecord:
    record = store.get(key_id) if is_key_id(key_id) else None
    if record is None:
        raise NotFound(f"no key with id {key_id[:40]!r}")
    return record


def revoke_key(store: KeyStore, key_id: str, now: float | None = None) -> KeyRecord:
    """Revoke now; revoking twice is harmless and keeps the first time."""
    get_key(store, key_id)
    record = store.revoke(key_id, time.time() if now is None else now)
    assert record is not None
    return record


def find_by_plaintext(store: KeyStore, plaintext: str) -> KeyRecord:
    """The stored key a (leaked) plaintext belongs to, even if it no longer works."""
    try:
        return match_key(store, plaintext)
    except InvalidCredentials:
        raise NotFound("that value is not a key in this store") from None
