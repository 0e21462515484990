"""keygate's key library: format, hashing, stores, verification, Flask extension.

Usable by any Flask app; it never imports the ``api`` package, reads no
environment variable, and knows no scope names of its own (see ``Scopes``).
"""

from .auth import KeyAuth, KeyAuthState, current_principal
from .exc import (
    AccessDenied,
    AuthThrottled,
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
from .issuing import IssuedKey, find_by_plaintext, get_key, issue_key, revoke_key, rotate_key
from .keyformat import generate_key, hash_key, looks_like_key, parse_key
from .model import KeyRecord, Principal
from .problem import problem_response
from .scopes import Scopes
from .sources import BearerKey, CredentialSource, HeaderKey, QueryToken
from .store import KeyStore, MemoryKeyStore, open_store
from .tokens import TokenSigner
from .verify import match_key, verify_key

__all__ = [
    "AccessDenied", "AuthThrottled", "AuthenticationError", "BearerKey", "ConfigError", "Conflict", "CredentialSource",
    "HeaderKey", "InsufficientScope", "InvalidCredentials", "InvalidRequest", "InvalidToken", "IpNotAllowed",
    "IssuedKey", "KeyAuth", "KeyAuthState", "KeyExpired", "KeyRecord", "KeyRevoked", "KeyStore",
    "KeygateError", "MemoryKeyStore", "MethodNotAllowed", "MissingCredentials", "MultipleCredentials",
    "NotFound", "PayloadTooLarge", "Principal", "QueryToken", "RateLimited", "Scopes", "StoreUnavailable",
    "TokenExpired", "TokenSigner", "current_principal", "find_by_plaintext", "generate_key", "get_key",
    "hash_key", "issue_key", "looks_like_key", "match_key", "open_store", "parse_key", "problem_response",
    "revoke_key", "rotate_key", "verify_key",
]
