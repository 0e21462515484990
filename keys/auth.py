"""``KeyAuth``: the Flask extension that turns a credential into ``g.principal``.

    auth = KeyAuth(app, store=store, scopes=["reports:read", "reports:write"])

    @app.get("/reports")
    @auth.require("reports:read")
    def reports(): ...

Credential sources are pluggable (the ``API-Key`` header, ``Authorization: Bearer``,
a query token, ...), and each names the challenge scheme a refusal answers with.
Every source is looked at on every request, so a request that carries two
credentials is refused as ambiguous even where only one kind is accepted.

A refusal raises a ``KeygateError``; ``init_app`` registers a handler that answers
it as problem+json (``keys.problem``), and ``@auth.error_handler`` renders it
instead. What depends on the app (store, scopes, realm) is kept per app in
``app.extensions["keygate"]``, so one ``KeyAuth`` serves any number of apps.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, Request, current_app, g, has_app_context, request
from flask.typing import ResponseReturnValue
from werkzeug.wrappers import Response

from .exc import (
    AuthenticationError,
    ConfigError,
    InsufficientScope,
    KeygateError,
    MissingCredentials,
    MultipleCredentials,
    StoreUnavailable,
)
from .keyformat import looks_like_key
from .model import Principal
from .problem import problem_response
from .scopes import Scopes, is_scope
from .sources import BearerKey, CredentialSource, HeaderKey, QueryToken, check_realm
from .store import SCHEMA_VERSION, KeyStore, open_store
from .verify import KeyLookup, check_ip

log = logging.getLogger("keygate.auth")
F = TypeVar("F", bound=Callable[..., Any])
ErrorRenderer = Callable[[KeygateError], Any]
#: The WSGI environ key under which an authenticated request's ``Principal`` is also kept.
PRINCIPAL_ENVIRON_KEY = "keygate.principal"
#: The ``app.config`` keys ``init_app`` reads; arguments given to ``KeyAuth`` win over them.
CONFIG_KEYS = ("KEYGATE_DATABASE_URL", "KEYGATE_SCOPES", "KEYGATE_SUPERSCOPE", "KEYGATE_REALM")
#: Headers that clients often put a key in by mistake: a request with no credential but a
#: key in one of these is told which header to use instead (never the value it sent).
MISPLACED_KEY_HEADERS = ("Authorization", "X-API-Key")
__all__ = ["PRINCIPAL_ENVIRON_KEY", "BearerKey", "CredentialSource", "HeaderKey", "KeyAuth", "KeyAuthState",
           "QueryToken", "check_schema", "current_principal"]


@dataclass(eq=False)
class KeyAuthState:
    """What ``KeyAuth`` uses for one app, kept in ``app.extensions["keygate"]``."""

    auth: KeyAuth
    store: KeyStore
    #: Where verification reads records: the store, or a ``CachedLookup`` in front of it.
    lookup: KeyLookup
    scopes: Scopes
    realm: str | None


def check_schema(store: KeyStore) -> None:
    """Refuse to serve from a store whose tables are missing or behind this code. One that
    can't be reached now may be back soon: its requests get 503 meanwhile, not a crash."""
    try:
        version = store.schema_version()
    except StoreUnavailable as e:
        log.warning("could not check the key store's schema: %s", e.detail)
        return
    if version < SCHEMA_VERSION:
        what = "has no tables yet" if version == 0 else f"is at schema version {version} of {SCHEMA_VERSION}"
        raise ConfigError(f"the key store {what}: call its migrate() once before serving (safe to repeat)")


class KeyAuth:
    """Flask extension: API-key verification with per-route scope requirements.

    Arguments win over the app's config (``CONFIG_KEYS``): ``store`` (else
    ``KEYGATE_DATABASE_URL``), ``scopes`` — the app's vocabulary, names or a ``Scopes``
    (else ``KEYGATE_SCOPES``; neither: any well-formed scope) — ``superscope``, the one
    scope that opens everything (else ``KEYGATE_SUPERSCOPE``; neither: none), and
    ``realm`` for challenges whose source sets none (else ``KEYGATE_REALM``).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        store: KeyStore | None = None,
        sources: Iterable[CredentialSource] | None = None,
        lookup: KeyLookup | None = None,
        scopes: Scopes | Iterable[str] | str | None = None,
        superscope: str | None = None,
        realm: str | None = None,
        misplaced_key_headers: Iterable[str] = MISPLACED_KEY_HEADERS,
    ) -> None:
        self._store = store
        self._lookup = lookup
        self._scopes = scopes
        self._superscope = superscope
        self._realm = check_realm(realm)
        self._closed_vocabulary = None if scopes is None else Scopes.coerce(scopes, superscope)
        self.misplaced_key_headers = tuple(misplaced_key_headers)
        self.sources: list[CredentialSource] = []
        for source in [HeaderKey()] if sources is None else sources:
            self.add_source(source)
        self._after_identification: list[Callable[[Principal], None]] = []
        self._after_auth: list[Callable[[Principal], None]] = []
        self._before_refusal: list[Callable[[KeygateError], None]] = []
        self._on_failure: list[Callable[[KeygateError], None]] = []
        self._render: ErrorRenderer | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, store: KeyStore | None = None, *, lookup: KeyLookup | None = None) -> None:
        """Set this extension up for ``app``: its store (checked: an uninitialised store is
        a ``ConfigError`` now, not a failure per request), scopes, realm, and the handler
        that renders refusals (unless the app registered one for ``KeygateError``)."""
        config = app.config
        if store is None and self._store is not None:
            store, lookup = self._store, lookup or self._lookup
        if store is None:
            url = config.get("KEYGATE_DATABASE_URL")
            if not url:
                raise ConfigError("KeyAuth needs a key store: KeyAuth(app, store=...), "
                                  "init_app(app, store) or KEYGATE_DATABASE_URL in app.config")
            try:
                store = open_store(str(url))
            except ConfigError as e:
                raise ConfigError(f"KEYGATE_DATABASE_URL: {e.detail}") from None
        check_schema(store)
        try:
            scopes = Scopes.coerce(
                self._scopes if self._scopes is not None else config.get("KEYGATE_SCOPES"),
                self._superscope if self._superscope is not None else config.get("KEYGATE_SUPERSCOPE"),
            )
        except ValueError as e:
            raise ConfigError(f"KEYGATE_SCOPES/KEYGATE_SUPERSCOPE: {e}") from None
        realm = self._realm if self._realm is not None else check_realm(config.get("KEYGATE_REALM"))
        app.extensions["keygate"] = KeyAuthState(self, store, lookup or store, scopes, realm)
        if KeygateError not in app.error_handler_spec[None][None]:
            app.register_error_handler(KeygateError, self._handle_error)

    # -- per-app state ----------------------------------------------------------

    def state(self, app: Flask | None = None) -> KeyAuthState:
        """This extension's state for ``app`` (default: the current app)."""
        if app is None:
            app = current_app._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
        state: KeyAuthState | None = app.extensions.get("keygate")
        if state is None or getattr(state, "auth", None) is not self:
            raise RuntimeError("this KeyAuth is not set up for this app: call auth.init_app(app)")
        return state

    @property
    def store(self) -> KeyStore:
        """The current app's store; outside an app context, the one given to ``KeyAuth()``."""
        if has_app_context():
            return self.state().store
        if self._store is None:
            raise RuntimeError("no store outside an app context: use auth.state(app).store")
        return self._store

    @property
    def lookup(self) -> KeyLookup:
        return self.state().lookup if has_app_context() else (self._lookup or self.store)

    @property
    def scopes(self) -> Scopes:
        """The current app's scope vocabulary (outside an app context, the one given to ``KeyAuth()``)."""
        if has_app_context():
            return self.state().scopes
        return self._closed_vocabulary or Scopes.coerce(None, self._superscope)

    # -- configuration ------------------------------------------------------------

    def add_source(self, source: CredentialSource) -> None:
        if any(s.kind == source.kind for s in self.sources):
            raise ValueError(f"a credential source of kind {source.kind!r} is already configured")
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

    def before_refusal(self, hook: Callable[[KeygateError], None]) -> Callable[[KeygateError], None]:
        """Register ``hook(error)`` to run first for every refusal: a ``KeygateError`` it
        raises is answered instead, and is what the failure hooks see (a throttle that
        answers 429 whatever the credential was)."""
        self._before_refusal.append(hook)
        return hook

    def on_failure(self, hook: Callable[[KeygateError], None]) -> Callable[[KeygateError], None]:
        """Register ``hook(error)`` to run for every refused request (failure metrics)."""
        self._on_failure.append(hook)
        return hook

    def error_handler(self, render: ErrorRenderer) -> ErrorRenderer:
        """Register ``render(error)`` to answer refusals instead of problem+json: it returns
        anything a view may return. The error's own headers (the challenge, ``Retry-After``)
        are added to its response unless it sets them itself."""
        self._render = render
        return render

    def _handle_error(self, error: KeygateError) -> ResponseReturnValue:
        if self._render is None:
            return problem_response(error)
        response: Response = current_app.make_response(current_app.ensure_sync(self._render)(error))
        for name, value in error.headers().items():
            response.headers.setdefault(name, value)
        return response

    # -- the request path -----------------------------------------------------------

    def _accepted(self, accept: Iterable[str] | None) -> tuple[str, ...]:
        if accept is None:
            return tuple(s.kind for s in self.sources if s.accepted_by_default)
        accepted = tuple(accept)
        unknown = sorted(set(accepted) - {s.kind for s in self.sources})
        if unknown:
            raise ValueError(f"no credential source of kind {', '.join(map(repr, unknown))}")
        return accepted

    def authenticate(self, scope: str | None, accept: Iterable[str] | None = None, *,
                     presented: str | None = None) -> Principal:
        """Authenticate and authorise the current request for ``scope`` via the sources of
        kinds ``accept`` (default: those accepted by default); raise a ``KeygateError``.

        ``presented`` is a credential the app received some other way (a sign-in form):
        it is checked as if it had come through the first accepted source, with every
        hook, allow-list and refusal of a request that carried it there."""
        return self._authorise(scope, self._accepted(accept), presented)

    def _authorise(self, scope: str | None, accept: tuple[str, ...], presented: str | None = None) -> Principal:
        state = self.state()
        req: Request = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
        try:
            principal = self._authenticate(state, req, scope, accept, presented)
            for hook in self._after_auth:
                hook(principal)
        except KeygateError as e:
            refusal = e
            try:
                for guard in self._before_refusal:
                    guard(e)
            except KeygateError as instead:
                refusal = instead
            for failure_hook in self._on_failure:
                failure_hook(refusal)
            if refusal is e:
                raise
            raise refusal from None
        # Only an authorised request gets a principal: after-request hooks, logs and the
        # response see none on a refusal.
        g._get_current_object().principal = principal  # ~1 µs less than via the proxy
        req.environ[PRINCIPAL_ENVIRON_KEY] = principal
        return principal

    def _authenticate(self, state: KeyAuthState, req: Request, scope: str | None,
                      accept: tuple[str, ...], presented: str | None = None) -> Principal:
        found = [(src, value) for src in self.sources if (value := src.extract(req)) is not None]
        if presented is not None:
            found.insert(0, (next(s for s in self.sources if s.kind == accept[0]), presented))
        if not found:
            wanted = " or ".join(s.description for s in self.sources if s.kind in accept)
            stray = self._misplaced_key(req)
            detail = f"Send a credential in {wanted}." if stray is None else \
                f"Send a credential in {wanted}: a key was sent in the {stray} header, which is not read here."
            raise self._challenged(MissingCredentials(detail), state, None, accept, refused=False)
        if len(found) > 1:
            raise MultipleCredentials(
                "Send exactly one credential: " + " or ".join(s.description for s, _ in found) + "."
            )
        source, value = found[0]
        try:
            principal = source.authenticate(value, state)
        except AuthenticationError as e:
            raise self._challenged(e, state, source, accept, refused=True) from None
        if principal.record.allowed_ips:
            # Not counted against the key's limit: from outside its allow-list, a stolen key
            # could otherwise use up its owner's quota.
            check_ip(principal.record, req.remote_addr)
        for hook in self._after_identification:
            hook(principal)  # before the scope check: a key's refused requests count too
        if source.kind not in accept:
            needs = "" if scope is None else f"; it needs the {scope!r} scope"
            via = " or ".join(s.description for s in self.sources if s.kind in accept)
            raise InsufficientScope(f"{source.description} can't open this resource{needs} via {via}",
                                    scope=scope)
        if scope is not None and not state.scopes.grants(principal.scopes, scope):
            refusal = InsufficientScope(f"this resource requires the {scope!r} scope", scope=scope)
            refusal.key_id = principal.key_id
            raise refusal
        return principal

    def _misplaced_key(self, req: Request) -> str | None:
        """The first of ``misplaced_key_headers`` holding a key (``Bearer kg_…``, ``kg_…``)."""
        for header in self.misplaced_key_headers:
            value = req.headers.get(header)
            if value is not None and looks_like_key(value.strip(" \t").rpartition(" ")[2]):
                return header
        return None

    def _challenged(self, error: AuthenticationError, state: KeyAuthState, source: CredentialSource | None,
                    accept: tuple[str, ...], refused: bool) -> AuthenticationError:
        """``error`` with its challenge: the refusing source's, or, when it has none (or
        nothing was sent), those of the sources the route accepts."""
        if error.challenge is None:
            if source is not None and source.scheme is not None:
                candidates = [source]
            else:
                candidates = [s for s in self.sources if s.scheme is not None and s.kind in accept] \
                    or [s for s in self.sources if s.scheme is not None]
            challenges = [c for s in candidates if (c := s.challenge(state.realm, refused))]
            error.challenge = ", ".join(challenges) or None
        return error

    def require(self, scope: str | None, *, accept: Iterable[str] | None = None) -> Callable[[F], F]:
        """Decorator: the view runs only for a caller holding ``scope`` via an accepted
        source (default: every source accepted by default); ``None`` admits any valid
        credential. Async views work too (Flask's ``ensure_sync``)."""
        accepted = self._accepted(accept)
        vocabulary = self._closed_vocabulary
        if scope is not None and not is_scope(scope):
            raise ValueError(f"not a valid scope name: {scope!r}")
        if scope is not None and vocabulary is not None and vocabulary.closed and scope not in vocabulary:
            raise ValueError(f"unknown scope {scope!r}; known scopes: {', '.join(vocabulary.names)}")

        def decorator(view: F) -> F:
            is_async = inspect.iscoroutinefunction(view)

            @functools.wraps(view)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self._authorise(scope, accepted)
                try:
                    if is_async:
                        return current_app.ensure_sync(view)(*args, **kwargs)
                    return view(*args, **kwargs)
                except AuthenticationError as e:  # a 401 from the view (a key revoked meanwhile)
                    raise self._challenged(e, self.state(), None, accepted, refused=True)

            wrapper.required_scope = scope  # type: ignore[attr-defined]
            wrapper.accepted_sources = accepted  # type: ignore[attr-defined]
            return wrapper  # type: ignore[return-value]

        return decorator


def current_principal() -> Principal | None:
    """The authorised caller of the current request, ``None`` when there is none."""
    principal: Principal | None = g.get("principal")
    return principal
