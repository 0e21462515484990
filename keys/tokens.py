"""Query tokens: short-lived, signed, scope-narrowed stand-ins for a key in a URL.

A token is an itsdangerous ``URLSafeTimedSerializer`` payload naming its parent
key, its scopes, its expiry and the parent's *generation*. Revoking or rotating
a key bumps the generation, so every token minted from it dies at once without
a deny-list. Several signing secrets may be configured: the first signs, all
verify, so the signing secret can rotate while live tokens keep working.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from itsdangerous.encoding import want_bytes

from .exc import InsufficientScope, InvalidRequest, InvalidToken, KeygateError, TokenExpired
from .keyformat import looks_like_key
from .model import AuditEvent, KeyRecord, Principal, isoformat
from .scopes import grants, parse_scopes
from .store.base import KeyStore
from .verify import KeyLookup, check_live

SALT = "keygate.query-token.v1"
DEFAULT_TTL = 900  # 15 minutes: long enough for a download, short enough to matter


class MintedToken(NamedTuple):
    token: str
    expires_at: float
    scopes: tuple[str, ...]


class _DerivedKeySigner(TimestampSigner):
    """itsdangerous' ``TimestampSigner``, deriving each secret's signing key once.

    Stock itsdangerous derives the HMAC key from the secret and the salt (a SHA-256) for
    every secret on every call. The derived key depends on nothing else, so it is kept;
    every token is still verified in full (nothing about a token is cached).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived = {secret: TimestampSigner.derive_key(self, secret) for secret in self.secret_keys}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        secret = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        derived = self._derived.get(secret)
        return TimestampSigner.derive_key(self, secret) if derived is None else derived


class TokenSigner:
    """Mints and checks query tokens against a key store."""

    def __init__(self, secret_keys: Sequence[str], max_ttl: int = 86400) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is required")
        # itsdangerous signs with the *last* key and verifies with all of them.
        self._serializer = URLSafeTimedSerializer(
            list(reversed(secret_keys)),
            salt=SALT,
            signer=_DerivedKeySigner,
            signer_kwargs={"digest_method": hashlib.sha256},
        )
        # One signer for every verification (``loads`` would build one, and derive every
        # secret's key again, per call). URLSafeTimedSerializer has no fallback signers,
        # so ``unsign`` + ``load_payload`` is exactly what its ``loads`` does.
        self._unsigner = self._serializer.make_signer()
        self.max_ttl = max_ttl

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
            raise InvalidRequest(
                f"ttl must be at most {self.max_ttl} seconds (KEYGATE_TOKEN_MAX_TTL)", field="ttl"
            )
        granted = record.scopes if scopes is None else parse_scopes(scopes)
        for scope in granted:
            if not grants(record.scopes, scope):
                raise InsufficientScope(f"the key does not hold the {scope!r} scope", scope=scope)
        now = time.time() if now is None else now
        expires_at = math.floor(now) + ttl
        payload = {"k": record.id, "s": " ".join(granted), "g": record.generation, "e": expires_at}
        return MintedToken(self._serializer.dumps(payload), float(expires_at), granted)

    def verify(self, store: KeyLookup, token: str, now: float | None = None) -> Principal:
        """The principal a token stands for; ``InvalidToken``/``TokenExpired`` otherwise."""
        if len(token) > 1024:
            raise InvalidToken()
        try:
            payload = self._serializer.load_payload(self._unsigner.unsign(token, max_age=self.max_ttl + 60))
        except SignatureExpired:
            raise TokenExpired() from None
        except BadSignature:
            if looks_like_key(token):
                raise InvalidToken(
                    "An API key is never accepted in a URL: send it in the API-Key header, "
                    "or mint a query token with POST /tokens."
                ) from None
            raise InvalidToken() from None
        try:
            key_id, scopes, generation, expires_at = payload["k"], payload["s"], payload["g"], payload["e"]
        except (TypeError, KeyError):
            raise InvalidToken() from None
        now = time.time() if now is None else now
        if expires_at <= now:
            raise TokenExpired()
        record = store.get(key_id)
        if record is None or record.generation != generation:
            raise InvalidToken("The token's key has been revoked or rotated.")
        try:
            check_live(record, now)
        except KeygateError:
            raise InvalidToken("The token's key is no longer valid.") from None
        return Principal(record.id, record.name, tuple(scopes.split()), "token", record)


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
    """Mint a token from a live key and record it in the audit trail (never the token)."""
    now = time.time() if now is None else now
    check_live(record, now)
    minted = signer.mint(record, scopes, ttl, now)
    store.record_event(AuditEvent("mint_token", record.id, actor, now, {
        "scopes": list(minted.scopes), "expires_at": isoformat(minted.expires_at),
    }))
    return minted
