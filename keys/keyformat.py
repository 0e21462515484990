"""The API key format: ``kg_`` + key id + secret + checksum, all base62.

``kg_`` makes a leaked key recognisable to secret scanners; the public key id
(12 chars, ~71 bits) is the indexed lookup; the secret (32 chars, ~190 bits)
is what proves possession; the CRC32 checksum (6 chars) lets a mistyped or
random string be refused before any store access, as GitHub's tokens do.

Only ``hash_key(key)`` is ever stored. A 190-bit random secret cannot be
brute-forced, so a single SHA-256 is enough and costs well under a microsecond;
bcrypt/argon2 stretching would only add milliseconds to every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from typing import NamedTuple

from .exc import InvalidCredentials

PREFIX = "kg_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_LENGTH = 12
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(PREFIX) + ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH

_ID_RE = re.compile(rf"[0-9A-Za-z]{{{ID_LENGTH}}}")


class ParsedKey(NamedTuple):
    key_id: str
    plaintext: str


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def _checksum(body: str) -> str:
    v = zlib.crc32(body.encode("ascii"))
    a = ALPHABET  # unrolled: 62**6 > 2**32, so six digits always suffice
    return (a[v // 916132832 % 62] + a[v // 14776336 % 62] + a[v // 238328 % 62]
            + a[v // 3844 % 62] + a[v // 62 % 62] + a[v % 62])


def new_key_id() -> str:
    return _random(ID_LENGTH)


def generate_key(key_id: str | None = None) -> ParsedKey:
    """A fresh key. Pass ``key_id`` only to re-key a known id (tests, migrations)."""
    key_id = key_id or new_key_id()
    body = PREFIX + key_id + _random(SECRET_LENGTH)
    return ParsedKey(key_id, body + _checksum(body))


def parse_key(value: str) -> ParsedKey:
    """Split a presented key, refusing anything malformed with one uniform error.

    String methods rather than a regex: this runs on every request. The
    checksum is no secret (anyone can compute it), so a plain comparison is fine.
    """
    if len(value) != KEY_LENGTH or not value.startswith(PREFIX):
        raise InvalidCredentials()
    body = value[:-CHECKSUM_LENGTH]
    rest = value[len(PREFIX):]
    if not (rest.isascii() and rest.isalnum()):
        raise InvalidCredentials()
    if _checksum(body) != value[-CHECKSUM_LENGTH:]:
        raise InvalidCredentials()
    return ParsedKey(value[len(PREFIX) : len(PREFIX) + ID_LENGTH], value)


def looks_like_key(value: str) -> bool:
    """True for a well-formed key with a valid checksum (no store access)."""
    try:
        parse_key(value)
    except InvalidCredentials:
        return False
    return True


def is_key_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value))


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("ascii")).hexdigest()


# Compared against when the key id is unknown, so unknown ids and wrong secrets
# take the same path and the same time.
UNKNOWN_KEY_HASH = hash_key(PREFIX + "0" * (KEY_LENGTH - len(PREFIX)))
