"""The app factory: settings → store → KeyAuth → Flask-RESTX namespaces."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import cached_property
from types import FunctionType, MethodType
from typing import Any

from flask import Flask, Response
from flask.sessions import SessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from keys import KeyAuth, open_store
from keys.auth import HeaderKey, QueryToken
from keys.cache import CachedLookup
from keys.verify import KeyLookup
from keys.exc import ConfigError, KeygateError, StoreUnavailable
from keys.store import SCHEMA_VERSION, KeyStore
from keys.ratelimit import Limiter, open_limiter
from keys.retention import AuditRetention
from keys.store.breaker import describe
from keys.tokens import TokenSigner
from keys.usage import UsageRecorder

from . import openapi
from .backends import RATE_LIMITER, STORE, Backends, Readiness
from .config import Settings, load_settings
from .instrument import Instrumented
from .metrics import DIRECTORY_NAME, Metrics, StoreCollector
from .problems import register_problem_handlers
from .ratelimits import RateLimits
from .responses import KeygateResponse
from .restx import KeygateApi
from .scopes import SCOPES

#: The realm of every challenge the service sends (``WWW-Authenticate: ApiKey realm="keygate"``).
REALM = "keygate"
#: What a caller who put an API key in ``?token=`` is told.
KEY_IN_URL_DETAIL = ("An API key is never accepted in a URL: send it in the API-Key header, "
                     "or mint a query token with POST /tokens.")
AUTHORIZATIONS = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "API-Key"},
    "token": {"type": "apiKey", "in": "query", "name": "token"},
}


def open_configured_store(settings: Settings) -> KeyStore:
    """The store ``KEYGATE_DATABASE_URL`` names, as it is; a URL it can't use is a
    ``ConfigError`` naming the variable."""
    try:
        return open_store(settings.database_url)
    except ConfigError as e:
        raise ConfigError(f"KEYGATE_DATABASE_URL: {e.detail}") from None


def open_configured_limiter(settings: Settings) -> Limiter:
    """The limiter ``KEYGATE_RATELIMIT_STORAGE_URL`` names (or the embedded one under
    ``KEYGATE_INSTANCE_PATH``); what it can't use is a ``ConfigError`` naming the variable."""
    try:
        return open_limiter(settings.ratelimit_storage_url, settings.instance_path, settings.ratelimit_prefix)
    except ConfigError as e:
        raise ConfigError(f"KEYGATE_RATELIMIT_STORAGE_URL: {e.detail}") from None
    except OSError as e:
        raise ConfigError(f"KEYGATE_INSTANCE_PATH: cannot create the rate-limit table: {e.strerror}") from None


def open_checked_store(settings: Settings) -> KeyStore:
    """The configured store, refusing to serve from one that ``init`` has not prepared."""
    store = open_configured_store(settings)
    try:
        version = store.schema_version()
    except StoreUnavailable as e:
        store.close()
        reason = describe(e.__cause__) if e.__cause__ is not None else e.detail  # one line
        raise StoreUnavailable(f"KEYGATE_DATABASE_URL: the key store is unavailable: {reason}") from None
    if version < SCHEMA_VERSION:
        store.close()
        what = "is not initialised" if version == 0 else f"is at schema version {version}"
        raise ConfigError(
            f"KEYGATE_DATABASE_URL: the key store {what}; run `python manage.py init` first"
        )
    return store


class KeygateFlask(Flask):
    """Flask, answering OPTIONS with 204 and ``Allow`` (Flask's default is a 200 with an
    empty ``text/html`` body); a CORS preflight, when enabled, adds its headers to it."""

    def make_default_options_response(self) -> Response:
        resp = super().make_default_options_response()
        resp.status_code = 204
        resp.headers.pop("Content-Type", None)
        return resp

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        # Flask asks ``inspect`` whether a view or hook is a coroutine function on every call,
        # twice a request here (~1 µs each); a function's kind never changes. Plain functions
        # (and those of bound methods) found synchronous are remembered, as many as the app
        # registered; a coroutine function gets Flask's fresh wrapper every time, as before.
        code = func.__func__ if type(func) is MethodType else func
        if type(code) is not FunctionType:
            return super().ensure_sync(func)
        if code in self._sync_functions:
            return func
        synced = super().ensure_sync(func)
        if synced is func:
            self._sync_functions.add(code)
        return synced

    @cached_property
    def _sync_functions(self) -> set[Callable[..., Any]]:
        return set()


#: What a browser may send and read when KEYGATE_CORS_ORIGINS allows its origin.
CORS_ALLOW_HEADERS = ["API-Key", "Content-Type"]
CORS_EXPOSE_HEADERS = ["Location", "Retry-After", "WWW-Authenticate", "RateLimit", "RateLimit-Policy",
                       "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"]


def _enable_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """CORS for exactly these origins (flask-cors); without any, no Access-Control-* header."""
    from flask_cors import CORS

    CORS(app, origins=list(origins), allow_headers=CORS_ALLOW_HEADERS,
         expose_headers=CORS_EXPOSE_HEADERS, methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],
         supports_credentials=False, max_age=600)


class _NoSessions(SessionInterface):
    def open_session(self, app: Flask, request: Any) -> None:
        return None  # Flask then uses a read-only NullSession

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        pass


def _closer(*closeables: Any) -> Callable[[], None]:
    """What a server calls as a worker exits: usage counters written, files and
    connections closed — each even if one before it failed."""

    def close() -> None:
        for thing in closeables:
            try:
                thing.close()
            except Exception:
                logging.getLogger("keygate").exception("while closing %s", type(thing).__name__)

    return close


def _open_metrics(settings: Settings) -> Metrics:
    try:
        return Metrics(settings.instance_path / DIRECTORY_NAME)
    except OSError as e:
        raise ConfigError(f"KEYGATE_INSTANCE_PATH: cannot create the metrics files: {e.strerror}") from None


#: Refusals counted by ``keygate_auth_refusals_total{code}`` (from zero, so alerts see them).
_REFUSAL_CODES = ("multiple_credentials", "missing_credentials", "invalid_credentials", "key_revoked",
                  "key_expired", "invalid_token", "token_expired", "insufficient_scope", "ip_not_allowed")


def _refusal_counter(metrics: Metrics) -> Callable[[KeygateError], None]:
    metrics.initialise(keygate_auth_refusals=_REFUSAL_CODES, keygate_rate_limited=("key", "auth_throttled"),
                       keygate_backend_errors=(STORE, RATE_LIMITER), keygate_usage_flush_seconds=())

    def count(e: KeygateError) -> None:
        if e.status == 429:
            metrics.inc("keygate_rate_limited", "key" if e.code == "rate_limited" else e.code)
        elif e.status in (400, 401, 403):
            metrics.inc("keygate_auth_refusals", e.code)

    return count


def _flush_reporter(metrics: Metrics, backends: Backends) -> Callable[[float, BaseException | None], None]:
    def report(seconds: float, error: BaseException | None) -> None:
        metrics.observe("keygate_usage_flush_seconds", seconds)
        if error is None:
            backends.ok(STORE)
        elif isinstance(error, StoreUnavailable):
            backends.failed(STORE, error, "usage counters wait in memory until it is back")
        else:
            logging.getLogger("keygate.usage").warning("could not write usage counters; will retry",
                                                       exc_info=error)

    return report


def create_app(config: Mapping[str, Any] | None = None, *, store: KeyStore | None = None) -> Flask:
    """Build the keygate WSGI app.

    ``config`` overrides environment settings by name without the ``KEYGATE_``
    prefix (``{"DATABASE_URL": "memory://"}``); other upper-case keys go to
    ``app.config``. ``store`` injects an already-open store (tests, embedding).
    """
    config = dict(config or {})
    settings = load_settings(config)
    app = KeygateFlask(__name__)
    app.response_class = KeygateResponse
    # keygate has no cookie sessions; Flask would open and save one on every request
    # (~18 µs measured in bench/).
    app.session_interface = _NoSessions()
    app.config.update(
        SECRET_KEY=settings.secret_keys[0],
        RESTX_MASK_SWAGGER=False,
        ERROR_INCLUDE_MESSAGE=False,
        RESTX_ERROR_404_HELP=False,
        JSON_SORT_KEYS=False,
    )
    app.config.update({k: v for k, v in config.items() if k.isupper()})
    app.extensions["keygate.settings"] = settings
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxies, x_proto=settings.trusted_proxies)

    store = store or open_checked_store(settings)
    signer = TokenSigner(settings.secret_keys, settings.token_max_ttl, SCOPES)
    metrics = _open_metrics(settings)
    backends = Backends(metrics)
    # Verification reads through a per-process cache of recently verified keys, emptied
    # whenever the store's revision moves (checked at most every 0.5 s): see keys/cache.py.
    # Up to 100,000 records (about 0.9 KB each, only keys actually used): a miss is a network
    # round trip on PostgreSQL and ~20 µs on SQLite, and with 4,096 on SQLite, 10,000 keys in
    # turn missed every time (0.73x of one key's req/s, bench_http.py). The memory store is
    # already memory.
    lookup: KeyLookup = store
    if store.backend in ("postgresql", "sqlite"):
        lookup = CachedLookup(store, max_entries=100_000)
        # Its revision check reads the store every 0.5 s under traffic: the sign an outage ended.
        lookup.on_reached = lambda: backends.ok(STORE)
    auth = KeyAuth(app, store=store, sources=[HeaderKey(), QueryToken(signer, key_in_url_detail=KEY_IN_URL_DETAIL)],
                   lookup=lookup, scopes=SCOPES, realm=REALM)
    usage = UsageRecorder(store, retention=settings.usage_retention)
    usage.on_flush = _flush_reporter(metrics, backends)
    # A key refused for a scope it lacks is counted in its hourly usage too (it carries its id).
    auth.on_failure(lambda e: usage.failure(e.code, getattr(e, "key_id", None)))
    auth.on_failure(_refusal_counter(metrics))
    app.extensions["keygate.usage"] = usage
    limiter = open_configured_limiter(settings)
    limits = RateLimits(app, auth, limiter, settings.default_rate_limit, usage, settings.ratelimit_fail_open,
                        backends, auth_failure_limit=settings.auth_failure_limit)
    app.extensions["keygate.signer"] = signer
    retention = AuditRetention(store, settings.audit_retention)
    retention.start()
    app.extensions["keygate.retention"] = retention
    app.extensions["keygate.metrics"] = metrics
    app.extensions["keygate.metrics_collector"] = StoreCollector(store, openapi.package_version())
    app.extensions["keygate.backends"] = backends
    app.extensions["keygate.readiness"] = Readiness(backends, {
        STORE: lambda: store.revision(), RATE_LIMITER: lambda: limiter.ping()})
    app.extensions["keygate.close"] = _closer(retention, usage, limiter, store, metrics)
    if settings.cors_origins:
        _enable_cors(app, settings.cors_origins)
    app.wsgi_app = Instrumented(app.wsgi_app, metrics)  # type: ignore[method-assign]

    api = KeygateApi(
        app,
        version=openapi.package_version(),
        title="keygate",
        description="A JSON API secured by API keys. Authorize with a key (API-Key header) "
        "or, on /data, a short-lived query token. The full contract, with every error response "
        "and header, is the OpenAPI 3.0.3 document at /openapi.json.",
        doc="/docs",
        authorizations=AUTHORIZATIONS,
        # /docs shows openapi.yaml (served by openapi.register below); a copy of keygate
        # installed without the file falls back to RESTX's own Swagger 2.0 document.
        docs_spec_endpoint="openapi" if openapi.load_document() is not None else None,
    )
    from .namespaces import admin_keys, health, operations, pages, tokens

    api.add_namespace(health.namespace())
    for ns in [*operations.namespaces(auth), *pages.namespaces(auth), tokens.namespace(auth, signer),
               *admin_keys.namespaces(auth, usage)]:
        api.add_namespace(ns)

    openapi.register(app, token_max_ttl=settings.token_max_ttl)  # GET /openapi.json
    register_problem_handlers(app)
    # The console: pages for people, signed in with a key, beside the API (api/console/).
    from .console import init_console

    init_console(app, auth, signer, limits, usage, settings.secret_keys)
    return app
