"""Checking a presented API key: the hot path of every request.

The order matters for what an attacker can learn. Format and checksum are
checked first (no store access); then the store is asked for the key id and the
hash compared in constant time, against a dummy hash when the id is unknown, so
an unknown id and a wrong secret are indistinguishable. Only a caller who holds
the real secret is told that the key is revoked or expired.
"""

from __future__ import annotations

import ipaddress
import time
from functools import lru_cache
from hmac import compare_digest
from typing import Protocol

from .exc import InvalidCredentials, IpNotAllowed, KeyExpired, KeyRevoked
from .keyformat import UNKNOWN_KEY_HASH, hash_key, parse_key
from .model import KeyRecord


class KeyLookup(Protocol):
    """What verification needs from a store: ``get`` (a ``KeyStore`` or a ``CachedLookup``)."""

    def get(self, key_id: str) -> KeyRecord | None: ...


def match_key(store: KeyLookup, presented: str) -> KeyRecord:
    """The stored record whose secret this is, live or not; ``InvalidCredentials`` otherwise."""
    parsed = parse_key(presented)
    record = store.get(parsed.key_id)
    expected = UNKNOWN_KEY_HASH if record is None else record.key_hash
    if not compare_digest(hash_key(parsed.plaintext), expected) or record is None:
        raise InvalidCredentials()
    return record


def verify_key(store: KeyLookup, presented: str, now: float | None = None) -> KeyRecord:
    """The stored record of a valid, live key; raises an ``AuthenticationError`` otherwise."""
    record = match_key(store, presented)
    check_live(record, now)
    return record


def check_live(record: KeyRecord, now: float | None = None) -> None:
    """Refuse a revoked key or one past its expiry (a future revocation is a grace period)."""
    if record.revoked_at is None and record.expires_at is None:
        return
    now = time.time() if now is None else now
    if record.revoked_at is not None and record.revoked_at <= now:
        raise KeyRevoked()
    if record.expires_at is not None and record.expires_at <= now:
        raise KeyExpired()


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    net = ipaddress.ip_network(text)
    mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
    if mapped is not None and net.prefixlen >= 96:  # ::ffff:10.0.0.0/104 is 10.0.0.0/8
        return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


@lru_cache(maxsize=1024)
def _networks(allowed: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    # Addresses are compared in IPv4 form when they are IPv4-mapped, so the blocks are too.
    # An entry that doesn't parse (written by an older keygate, or by hand) admits nobody:
    # refused with 403 like any address outside the list, never a 500 and never "anywhere".
    networks = []
    for text in allowed:
        try:
            net = _network(text)
        except ValueError:
            continue
        if getattr(net.network_address, "scope_id", None) is None:  # "::%eth0": never written now
            networks.append(net)
    return tuple(networks)


def ip_allowed(allowed: tuple[str, ...], address: str | None) -> bool:
    """Whether ``address`` lies in one of the ``allowed`` CIDR blocks (empty = anywhere)."""
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 to a dual-stack socket
    return any(ip in net for net in _networks(allowed))


def check_ip(record: KeyRecord, address: str | None) -> None:
    if not ip_allowed(record.allowed_ips, address):
        raise IpNotAllowed(f"requests with this key are not allowed from {address}")
