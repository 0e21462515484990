"""keygate's key library: format, hashing, stores, verification, Flask extension.

Usable by any Flask app; it never imports the ``api`` package.
"""

from .auth import CredentialSource, HeaderKey, KeyAuth, current_principal
from .exc import (
    AccessDenied,
    AuthenticationError,
    ConfigError,
    Conflict,
    InsufficientScope,
    InvalidCredentials,
    InvalidRequest,
    InvalidToken,
    IpNotAllowed,
    KeyExpired,
    KeygateError,
    KeyRevoked,
    MethodNotAllowed,
    MissingCredentials,
    MultipleCredentials,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    StoreUnavailable,
    TokenExpired,
)
from .issuing import IssuedKey, find_by_plaintext, get_key, issue_key, revoke_key
from .keyformat import generate_key, hash_key, looks_like_key, parse_key
from .model import KeyRecord, Principal
from .store import KeyStore, MemoryKeyStore, open_store
from .verify import match_key, verify_key

__all__ = [
    "AccessDenied", "AuthenticationError", "ConfigError", "Conflict", "CredentialSource", "HeaderKey",
    "InsufficientScope", "InvalidCredentials", "InvalidRequest", "InvalidToken", "IpNotAllowed",
    "IssuedKey", "KeyAuth", "KeyExpired", "KeyRecord", "KeyRevoked", "KeyStore", "KeygateError",
    "MemoryKeyStore", "MethodNotAllowed", "MissingCredentials", "MultipleCredentials", "NotFound",
    "PayloadTooLarge", "Principal", "RateLimited", "StoreUnavailable", "TokenExpired", "current_principal",
    "find_by_plaintext", "generate_key", "get_key", "hash_key", "issue_key", "looks_like_key",
    "match_key", "open_store", "parse_key", "revoke_key", "verify_key",
]
