"""One exception hierarchy for everything keygate refuses.

Every class maps to exactly one contract ``code`` and HTTP ``status``, so a web
layer can render any of them without a lookup table, and callers can catch at
any level: ``KeygateError`` (everything), ``AuthenticationError`` (401s),
``AccessDenied`` (403s) or a single code.
"""

from __future__ import annotations


class KeygateError(Exception):
    """Base of every error keygate raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"
    default_detail: str = ""

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.default_detail or self.title
        super().__init__(self.detail)

    def headers(self) -> dict[str, str]:
        """Extra response headers this error requires (challenges, retry hints)."""
        return {}


class ConfigError(KeygateError):
    """Bad configuration; raised at start-up, never while serving."""

    code = "config_error"
    title = "Bad configuration"


class StoreUnavailable(KeygateError):
    """The key store could not be reached; no credential is accepted meanwhile."""

    status = 503
    code = "store_unavailable"
    title = "Key store unavailable"
    #: What a client is told; the cause goes to the server's log only (it may name hosts).
    default_detail = "the key store is unavailable; try again shortly"
    #: A hint for clients: long enough not to hammer a recovering store, short enough for a blip.
    retry_after = 5

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


# -- 400 ---------------------------------------------------------------------


class BadRequest(KeygateError):
    status = 400


class MultipleCredentials(BadRequest):
    code = "multiple_credentials"
    title = "More than one credential"


class InvalidRequest(BadRequest):
    """A malformed body, parameter or CLI argument; ``field`` names the culprit."""

    code = "invalid_request"
    title = "Invalid request"

    def __init__(self, detail: str | None = None, field: str | None = None) -> None:
        self.field = field
        super().__init__(detail)


# -- 401 ---------------------------------------------------------------------


class AuthenticationError(KeygateError):
    """No acceptable credential. ``KeyAuth`` sets ``challenge`` (RFC 9110 §11.6.1) from the
    credential sources involved, whose scheme and realm the app chose."""

    status = 401
    #: The ``WWW-Authenticate`` value to answer with; ``None`` until ``KeyAuth`` sets it.
    challenge: str | None = None
    #: Whether nothing in the refused credential proved genuine (a wrong key, a forged token):
    #: what a throttle of guessing counts. A revoked key or an expired token is no guess.
    guess: bool = False

    def headers(self) -> dict[str, str]:
        return {} if self.challenge is None else {"WWW-Authenticate": self.challenge}


class MissingCredentials(AuthenticationError):
    code = "missing_credentials"
    title = "Credentials required"
    default_detail = "Send a credential."


class InvalidCredentials(AuthenticationError):
    """Unknown, malformed, mistyped or wrong: one answer, so keys can't be probed."""

    code = "invalid_credentials"
    title = "Invalid credentials"
    guess = True
    default_detail = "The API key is not valid."


class KeyRevoked(AuthenticationError):
    code = "key_revoked"
    title = "Key revoked"
    default_detail = "This API key has been revoked."


class KeyExpired(AuthenticationError):
    code = "key_expired"
    title = "Key expired"
    default_detail = "This API key has expired."


class InvalidToken(AuthenticationError):
    code = "invalid_token"
    title = "Invalid token"
    default_detail = "The token is not valid."
    guess = True

    def __init__(self, detail: str | None = None, *, guess: bool | None = None) -> None:
        super().__init__(detail)
        if guess is not None:  # False: its signature held, but its key has changed since
            self.guess = guess


class TokenExpired(InvalidToken):
    code = "token_expired"
    title = "Token expired"
    default_detail = "The token has expired; mint a new one."
    guess = False  # only a genuine token can say it has expired


# -- 403 ---------------------------------------------------------------------


class AccessDenied(KeygateError):
    status = 403


class InsufficientScope(AccessDenied):
    code = "insufficient_scope"
    title = "Insufficient scope"

    #: The verified key that lacked the scope (``KeyAuth`` sets it), for per-key usage counts.
    key_id: str | None = None

    def __init__(self, detail: str | None = None, scope: str | None = None) -> None:
        self.scope = scope
        super().__init__(detail)


class IpNotAllowed(AccessDenied):
    code = "ip_not_allowed"
    title = "Address not allowed"


# -- 404 / 405 / 409 / 413 / 429 -----------------------------------------------


class NotFound(KeygateError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(KeygateError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class Conflict(KeygateError):
    """The request contradicts the resource's state (rotating a revoked key)."""

    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(KeygateError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class RateLimited(KeygateError):
    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, detail: str | None = None, retry_after: int = 1) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(detail)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class AuthThrottled(RateLimited):
    """Too many refused credentials from one client address: every credential it sends is
    answered with this, checked or not, until ``retry_after`` — a 200 among 429s would go
    on confirming guesses."""

    code = "auth_throttled"
    title = "Too many refused credentials"


def error_for_code(code: str) -> type[KeygateError]:
    """The error class behind a contract code (used by docs and tests)."""
    stack: list[type[KeygateError]] = [KeygateError]
    while stack:
        cls = stack.pop()
        if cls.__dict__.get("code") == code:
            return cls
        stack.extend(cls.__subclasses__())
    raise LookupError(code)
