"""Credential sources: where a key can arrive in a request, how to check it, and the
challenge (RFC 9110 §11.6.1: scheme and realm) that asks a client for one."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from flask import Request

from .exc import ConfigError, InvalidToken
from .keyformat import looks_like_key
from .model import Principal
from .tokens import TokenSigner
from .verify import verify_key

if TYPE_CHECKING:
    from .auth import KeyAuthState

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: an auth-scheme


def _auth_scheme(scheme: str) -> str:
    if not _TOKEN_RE.fullmatch(scheme):
        raise ConfigError(f"not an HTTP authentication scheme: {scheme[:40]!r}")
    return scheme


def check_realm(realm: object) -> str | None:
    """A realm fit for a quoted header parameter: printable ASCII (no line breaks to inject)."""
    if realm is None:
        return None
    if not isinstance(realm, str) or not realm or not (realm.isascii() and realm.isprintable()):
        raise ConfigError(f"realm must be printable ASCII text, not {str(realm)[:40]!r}")
    return realm


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class CredentialSource(ABC):
    """One place a credential can arrive, how to check what arrives there, and the
    challenge (scheme and realm) that asks a client for it."""

    #: Name routes use to say which sources they accept ("header", "bearer", "token").
    kind: str
    #: Human description used in error details ("the API-Key header").
    description: str
    #: The auth-scheme of this source's ``WWW-Authenticate`` challenge; ``None`` for a
    #: source that is no HTTP authentication scheme (a query argument).
    scheme: str | None = None
    #: The challenge's realm; ``None`` takes the ``KeyAuth``'s realm for the app.
    realm: str | None = None
    #: Whether ``require()`` accepts this source when it isn't told which (``accept=``).
    accepted_by_default: bool = True

    @abstractmethod
    def extract(self, req: Request) -> str | None:
        """The raw credential, or ``None`` when this source is absent."""

    @abstractmethod
    def authenticate(self, value: str, state: KeyAuthState) -> Principal:
        """Verify the credential; raise an ``AuthenticationError`` if it is refused."""

    def challenge(self, realm: str | None, refused: bool) -> str | None:
        """``<scheme> realm="…"``, with RFC 6750's ``error="invalid_token"`` when a
        credential was sent and refused; ``None`` for a source without a scheme."""
        if self.scheme is None:
            return None
        params = []
        realm = self.realm if self.realm is not None else realm
        if realm is not None:
            params.append(f"realm={_quoted(realm)}")
        if refused:
            params.append('error="invalid_token"')
        return f"{self.scheme} {', '.join(params)}" if params else self.scheme


class HeaderKey(CredentialSource):
    """An API key in a request header of its own (``API-Key`` by default), challenged as ``ApiKey``."""

    kind = "header"

    def __init__(self, header: str = "API-Key", *, scheme: str = "ApiKey", realm: str | None = None) -> None:
        if not _TOKEN_RE.fullmatch(header):
            raise ConfigError(f"not a header name: {header[:40]!r}")
        self.header = header
        self.description = f"the {header} header"
        self.scheme = _auth_scheme(scheme)
        self.realm = check_realm(realm)
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")

    def extract(self, req: Request) -> str | None:
        value = req.environ.get(self._environ_key)
        # Surrounding spaces are not part of a field value (RFC 9110 §5.5); some servers
        # strip them, others don't: one behaviour everywhere.
        return None if value is None else value.strip(" \t")

    def authenticate(self, value: str, state: KeyAuthState) -> Principal:
        record = verify_key(state.lookup, value)
        return Principal(record.id, record.name, record.scopes, self.kind, record)


class BearerKey(HeaderKey):
    """An API key as an RFC 6750 bearer token: ``Authorization: Bearer <key>``.

    A request whose ``Authorization`` names another scheme (``Basic …``) carries no
    credential of this kind."""

    kind = "bearer"

    def __init__(self, *, realm: str | None = None) -> None:
        super().__init__("Authorization", scheme="Bearer", realm=realm)
        self.description = "an Authorization: Bearer header"

    def extract(self, req: Request) -> str | None:
        value: str | None = req.environ.get("HTTP_AUTHORIZATION")
        if value is None:
            return None
        scheme, _, credential = value.strip(" \t").partition(" ")
        if scheme.lower() != "bearer":  # auth-schemes are case-insensitive (RFC 9110 §11.1)
            return None
        return credential.strip(" \t")


class QueryToken(CredentialSource):
    """A signed query token in the ``token`` query argument (see ``keys.tokens``).

    Not an HTTP authentication scheme, so its refusals challenge with the route's
    other sources; accepted only where a route says so (``accept=("header", "token")``).
    ``key_in_url_detail`` is what to tell a caller who put an API key there instead.
    """

    kind = "token"
    accepted_by_default = False

    def __init__(self, signer: TokenSigner, arg: str = "token", *, key_in_url_detail: str | None = None) -> None:
        self.signer = signer
        self.arg = arg
        self.description = f"the {arg!r} query argument"
        self.key_in_url_detail = key_in_url_detail
        self._only_arg = arg + "="

    def extract(self, req: Request) -> str | None:
        query = req.environ.get("QUERY_STRING")
        if not query:
            return None  # the common case costs no query parsing
        if query.startswith(self._only_arg):
            # ``?token=…`` and nothing else, with nothing to decode: the value is the rest,
            # exactly what werkzeug's parse would give, without building a MultiDict.
            value: str = query[len(self._only_arg):]
            if value.isascii() and "&" not in value and "%" not in value and "+" not in value:
                return value
        token: str | None = req.args.get(self.arg)
        return token

    def authenticate(self, value: str, state: KeyAuthState) -> Principal:
        try:
            return self.signer.verify(state.lookup, value)
        except InvalidToken:
            if self.key_in_url_detail is not None and looks_like_key(value):
                raise InvalidToken(self.key_in_url_detail) from None
            raise
