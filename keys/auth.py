"""``KeyAuth``: the Flask extension that turns a credential into ``g.principal``.

    auth = KeyAuth(app, store=open_store(url))

    @auth.require("secret:read")
    def get(): ...

Credential sources are pluggable (the ``API-Key`` header, a query token, ...).
Every source is looked at on every request, so a request that carries two
credentials is refused as ambiguous even where only one kind is accepted.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Flask, Request, g, request

from .exc import InsufficientScope, KeygateError, MissingCredentials, MultipleCredentials
from .model import Principal
from .scopes import grants
from .store.base import KeyStore
from .tokens import TokenSigner
from .verify import KeyLookup, check_ip, verify_key

F = TypeVar("F", bound=Callable[..., Any])
#: The WSGI environ key under which an authenticated request's ``Principal`` is also kept.
PRINCIPAL_ENVIRON_KEY = "keygate.principal"


class CredentialSource(ABC):
    """One place a credential can arrive, and how to check what arrives there."""

    #: Name routes use to say which sources they accept ("header", "token").
    kind: str
    #: Human description used in error details ("the API-Key header").
    description: str

    @abstractmethod
    def extract(self, req: Request) -> str | None:
        """The raw credential, or ``None`` when this source is absent."""

    @abstractmethod
    def authenticate(self, value: str, auth: KeyAuth) -> Principal:
        """Verify the credential; raise an ``AuthenticationError`` if it is refused."""


class HeaderKey(CredentialSource):
    """An API key in a request header (``API-Key`` by default)."""

    kind = "header"

    def __init__(self, header: str = "API-Key") -> None:
        self.header = header
        self.description = f"the {header} header"
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")

    def extract(self, req: Request) -> str | None:
        value = req.environ.get(self._environ_key)
        # Surrounding spaces are not part of a field value (RFC 9110 §5.5); gunicorn strips
        # them, other servers may not: one behaviour everywhere.
        return None if value is None else value.strip(" \t")

    def authenticate(self, value: str, auth: KeyAuth) -> Principal:
        record = verify_key(auth.lookup, value)
        return Principal(record.id, record.name, record.scopes, self.kind, record)


class KeyAuth:
    """Flask extension: API-key verification with per-route scope requirements."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: KeyStore | None = None,
        sources: Iterable[CredentialSource] | None = None,
        lookup: KeyLookup | None = None,
    ) -> None:
        self.store: KeyStore = store  # type: ignore[assignment]
        #: Where verification reads records: the store, or a ``CachedLookup`` in front of it.
        self.lookup: KeyLookup = lookup or store  # type: ignore[assignment]
        self.sources: list[CredentialSource] = list(sources) if sources is not None else [HeaderKey()]
        self._after_identification: list[Callable[[Principal], None]] = []
        self._after_auth: list[Callable[[Principal], None]] = []
        self._on_failure: list[Callable[[KeygateError], None]] = []
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, store: KeyStore | None = None) -> None:
        if store is not None:
            self.store = store
            self.lookup = self.lookup or store
        if self.store is None:
            raise RuntimeError("KeyAuth needs a store: KeyAuth(app, store=...) or init_app(app, store)")
        app.extensions["keygate"] = self

    def add_source(self, source: CredentialSource) -> None:
        self.sources.append(source)

    def after_identification(self, hook: Callable[[Principal], None]) -> Callable[[Principal], None]:
        """Register ``hook(principal)`` to run once the credential is verified, before the
        scope is checked: it sees every request a key makes, refused for scope or not (rate
        limits: a stolen key probing scopes spends its own quota)."""
        self._after_identification.append(hook)
        return hook

    def after_authentication(self, hook: Callable[[Principal], None]) -> Callable[[Principal], None]:
        """Register ``hook(principal)`` to run once a request is authorised (usage)."""
        self._after_auth.append(hook)
        return hook

    def on_failure(self, hook: Callable[[KeygateError], None]) -> Callable[[KeygateError], None]:
        """Register ``hook(error)`` to run for every refused request (failure metrics)."""
        self._on_failure.append(hook)
        return hook

    def authenticate(self, scope: str | None, accept: tuple[str, ...] = ("header",)) -> Principal:
        """Authenticate and authorise the current request for ``scope``."""
        try:
            principal = self._authenticate(scope, accept)
            for hook in self._after_auth:
                hook(principal)
        except KeygateError as e:
            for failure_hook in self._on_failure:
                failure_hook(e)
            raise
        return principal

    def _authenticate(self, scope: str | None, accept: tuple[str, ...]) -> Principal:
        req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not one per use
        found = [(src, value) for src in self.sources if (value := src.extract(req)) is not None]
        if not found:
            wanted = " or ".join(s.description for s in self.sources if s.kind in accept)
            raise MissingCredentials(f"Send a credential in {wanted}.")
        if len(found) > 1:
            raise MultipleCredentials(
                "Send exactly one credential: " + " or ".join(s.description for s, _ in found) + "."
            )
        source, value = found[0]
        principal = source.authenticate(value, self)
        if principal.record.allowed_ips:
            # Not counted against the key's limit: from outside its allow-list, a stolen key
            # could otherwise use up its owner's quota.
            check_ip(principal.record, req.remote_addr)
        g.principal = principal
        req.environ[PRINCIPAL_ENVIRON_KEY] = principal  # for WSGI-level readers (responses, logs)
        for hook in self._after_identification:
            hook(principal)
        if source.kind not in accept:
            needs = "" if scope is None else f"; it needs the {scope!r} scope"
            via = " or ".join(s.description for s in self.sources if s.kind in accept)
            raise InsufficientScope(f"{source.description} can't open this resource{needs} via {via}",
                                    scope=scope)
        if scope is not None and not grants(principal.scopes, scope):
            raise InsufficientScope(f"this resource requires the {scope!r} scope", scope=scope)
        return principal

    def require(self, scope: str | None, *, accept: Iterable[str] = ("header",)) -> Callable[[F], F]:
        """Decorator: the view runs only for a caller holding ``scope`` via an accepted
        source; ``None`` admits any valid credential."""
        accepted = tuple(accept)

        def decorator(view: F) -> F:
            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.authenticate(scope, accepted)
                return view(*args, **kwargs)

            wrapper.required_scope = scope  # type: ignore[attr-defined]
            wrapper.accepted_sources = accepted  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        return decorator


def current_principal() -> Principal | None:
    return g.get("principal")


class QueryToken(CredentialSource):
    """A signed query token in the ``token`` query argument (see ``keys.tokens``)."""

    kind = "token"

    def __init__(self, signer: TokenSigner, arg: str = "token") -> None:
        self.signer = signer
        self.arg = arg
        self.description = f"the {arg!r} query argument"
        self._only_arg = arg + "="

    def extract(self, req: Request) -> str | None:
        query = req.environ.get("QUERY_STRING")
        if not query:
            return None  # the common case costs no query parsing
        if query.startswith(self._only_arg):
            # ``?token=…`` and nothing else, with nothing to decode: the value is the rest,
            # exactly what werkzeug's parse would give, without building a MultiDict.
            value = query[len(self._only_arg):]
            if value.isascii() and "&" not in value and "%" not in value and "+" not in value:
                return value
        return req.args.get(self.arg)

    def authenticate(self, value: str, auth: KeyAuth) -> Principal:
        return self.signer.verify(auth.lookup, value)
