"""Query tokens: short-lived, signed, scope-narrowed stand-ins for a key in a URL.

A token is ``<key id>.<generation>.<expires at>.<scopes>.<signature>``: an
itsdangerous ``Signer`` (HMAC-SHA256, its own salt) over a compact payload that
names the parent key, the key's *generation*, the expiry (epoch seconds) and the
scopes (base64url of their space-separated names). Every character is URL-safe,
so a token travels in a query string unencoded. Revoking or rotating a key bumps
its generation, so every token minted from it dies at once without a deny-list.
Several signing secrets may be configured: the first signs, all verify, so the
signing secret can rotate while live tokens keep working.

Why not itsdangerous' ``URLSafeTimedSerializer`` (the first format, salt ``v1``):
its base64-of-JSON payload plus a separate timestamp cost three base64 decodes
and a JSON parse per request, twice what checking a header key costs
(``bench/``). The payload here carries its own expiry, so a plain ``Signer`` is
enough; ``v1`` tokens (15 minutes by default) are refused as invalid.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from itsdangerous import BadSignature, Signer
from itsdangerous.signer import HMACAlgorithm

from .exc import InsufficientScope, InvalidRequest, InvalidToken, KeygateError, TokenExpired
from .keyformat import looks_like_key
from .model import AuditEvent, KeyRecord, Principal, isoformat
from .scopes import ANY_SCOPE, Scopes
from .store.base import KeyStore
from .verify import KeyLookup, check_live

SALT = "keygate.query-token.v2"
DEFAULT_TTL = 900  # 15 minutes: long enough for a download, short enough to matter
MAX_TOKEN_LENGTH = 1024


class MintedToken(NamedTuple):
    token: str
    expires_at: float
    scopes: tuple[str, ...]


class _KeyedHMAC(HMACAlgorithm):
    """HMAC-SHA256 that sets each key up once and copies it per message.

    ``hmac.new`` hashes the key pads on every call; copying a keyed HMAC skips
    that (0.7 vs 1.1 µs). The result is the same HMAC."""

    def __init__(self) -> None:
        super().__init__(hashlib.sha256)
        self._keyed: dict[bytes, Any] = {}

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        keyed = self._keyed.get(key)
        if keyed is None:
            keyed = self._keyed[key] = hmac.new(key, digestmod=self.digest_method)
        mac = keyed.copy()
        mac.update(value)
        return mac.digest()


class _TokenSigner(Signer):
    """itsdangerous' ``Signer``, deriving each secret's signing key once.

    Stock itsdangerous derives the HMAC key from the secret and the salt (a SHA-256)
    for every secret on every call. The derived key depends on nothing else, so it is
    kept; every token is still verified in full (nothing about a token is cached).
    """

    def __init__(self, secret_keys: Sequence[str]) -> None:
        # itsdangerous signs with the *last* key and verifies with all of them, last first.
        super().__init__(list(reversed(secret_keys)), salt=SALT, digest_method=hashlib.sha256,
                         algorithm=_KeyedHMAC())
        self._derived = {secret: Signer.derive_key(self, secret) for secret in self.secret_keys}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        secret = self.secret_keys[-1] if secret_key is None else secret_key
        derived = self._derived.get(secret) if isinstance(secret, bytes) else None
        return Signer.derive_key(self, secret) if derived is None else derived


def _encode_scopes(scopes: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(" ".join(scopes).encode()).rstrip(b"=").decode()


@functools.lru_cache(maxsize=256)  # only signed payloads get here: a handful of scope sets
def _decode_scopes(text: str) -> tuple[str, ...]:
    return tuple(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode().split())


class TokenSigner:
    """Mints and checks query tokens against a key store.

    ``scopes`` is the app's vocabulary: what a token may be narrowed to, and whether
    a key's superscope lets it mint a token for any scope."""

    def __init__(self, secret_keys: Sequence[str], max_ttl: int = 86400, scopes: Scopes = ANY_SCOPE) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is required")
        self._signer = _TokenSigner(secret_keys)
        self.max_ttl = max_ttl
        self.scopes = scopes

    def mint(
        self,
        record: KeyRecord,
        scopes: Iterable[str] | None = None,
        ttl: int | None = None,
        now: float | None = None,
    ) -> MintedToken:
        """A token for ``record`` narrowed to ``scopes`` (default: all of the key's)."""
        if ttl is None:
            ttl = min(DEFAULT_TTL, self.max_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise InvalidRequest("ttl must be a positive whole number of seconds", field="ttl")
        if ttl > self.max_ttl:
            raise InvalidRequest(f"ttl must be at most {self.max_ttl} seconds", field="ttl")
        granted = record.scopes if scopes is None else self.scopes.parse(scopes)
        for scope in granted:
            if not self.scopes.grants(record.scopes, scope):
                raise InsufficientScope(f"the key does not hold the {scope!r} scope", scope=scope)
        now = time.time() if now is None else now
        expires_at = math.floor(now) + ttl
        payload = f"{record.id}.{record.generation}.{expires_at}.{_encode_scopes(granted)}"
        return MintedToken(self._signer.sign(payload).decode(), float(expires_at), granted)

    def verify(self, store: KeyLookup, token: str, now: float | None = None) -> Principal:
        """The principal a token stands for; ``InvalidToken``/``TokenExpired`` otherwise."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken()
        try:
            payload = self._signer.unsign(token)
        except BadSignature:
            if looks_like_key(token):
                raise InvalidToken("An API key is never accepted as a query token.") from None
            raise InvalidToken() from None
        # Only this class signs with this salt, so a payload that doesn't parse is a bug or
        # a secret shared with something else: refused, never a 500.
        try:
            key_id, generation, expires_at, scopes = payload.decode().rsplit(".", 3)
            generation_n, expires_n = int(generation), int(expires_at)
            granted = _decode_scopes(scopes)
        except (ValueError, binascii.Error):
            raise InvalidToken() from None
        now = time.time() if now is None else now
        if expires_n <= now:
            raise TokenExpired()
        if expires_n > now + self.max_ttl + 60:  # minted before max_ttl was lowered
            raise InvalidToken("The token outlives the longest lifetime now allowed.", guess=False)
        record = store.get(key_id)
        if record is None or record.generation != generation_n:
            raise InvalidToken("The token's key has been revoked or rotated.", guess=False)
        try:
            check_live(record, now)
        except KeygateError:
            raise InvalidToken("The token's key is no longer valid.", guess=False) from None
        return Principal(record.id, record.name, granted, "token", record)


#: Token mints are audited as one summary row per key, actor and period (an hour), not one
#: row each: at the default rate limit a key could otherwise add 864,000 rows a day.
MINT_AUDIT_PERIOD = 3600


def merge_mints(summary: dict[str, Any] | None, minted: dict[str, Any]) -> dict[str, Any]:
    """A mint folded into its period's summary: how many, which scopes, the last one, and
    until when the latest-expiring token lives."""
    if summary is None:
        return {"count": 1, "scopes": list(minted["scopes"]), "last_at": minted["minted_at"],
                "expires_at": minted["expires_at"]}
    scopes = list(summary.get("scopes", []))
    scopes += [scope for scope in minted["scopes"] if scope not in scopes]
    return {"count": int(summary.get("count", 1)) + 1, "scopes": scopes, "last_at": minted["minted_at"],
            "expires_at": max(summary.get("expires_at") or "", minted["expires_at"])}


def mint_token(
    store: KeyStore,
    signer: TokenSigner,
    record: KeyRecord,
    *,
    actor: str,
    scopes: Iterable[str] | None = None,
    ttl: int | None = None,
    now: float | None = None,
) -> MintedToken:
    """Mint a token from a live key and count it in the audit trail (never the token)."""
    now = time.time() if now is None else now
    check_live(record, now)
    minted = signer.mint(record, scopes, ttl, now)
    store.summarize(AuditEvent("mint_token", record.id, actor, now, {
        "scopes": list(minted.scopes), "expires_at": isoformat(minted.expires_at),
        "minted_at": isoformat(now),
    }), int(now // MINT_AUDIT_PERIOD), merge_mints)
    return minted
