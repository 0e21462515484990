"""The app factory: settings → store → KeyAuth → Flask-RESTX namespaces."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response
from flask.sessions import SessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from keys import KeyAuth, open_store
from keys.auth import HeaderKey, QueryToken
from keys.cache import CachedLookup
from keys.verify import KeyLookup
from keys.exc import ConfigError, StoreUnavailable
from keys.store import SCHEMA_VERSION, KeyStore
from keys.ratelimit import Limiter, open_limiter
from keys.tokens import TokenSigner
from keys.usage import UsageRecorder

from . import openapi
from .config import Settings, load_settings
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
        reason = " ".join(str(e.__cause__ or e.detail).split())  # drivers' errors span lines
        raise StoreUnavailable(f"KEYGATE_DATABASE_URL: cannot reach the key store: {reason}") from None
    if version < SCHEMA_VERSION:
        store.close()
        what = "is not initialised" if version == 0 else f"is at schema version {version}"
        raise ConfigError(
            f"KEYGATE_DATABASE_URL: the key store {what}; run `python manage.py init` first"
        )
    return store


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


def create_app(config: Mapping[str, Any] | None = None, *, store: KeyStore | None = None) -> Flask:
    """Build the keygate WSGI app.

    ``config`` overrides environment settings by name without the ``KEYGATE_``
    prefix (``{"DATABASE_URL": "memory://"}``); other upper-case keys go to
    ``app.config``. ``store`` injects an already-open store (tests, embedding).
    """
    config = dict(config or {})
    settings = load_settings(config)
    app = Flask(__name__)
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
    # Verification reads through a per-process cache of recently verified keys, emptied
    # whenever the store's revision moves (checked at most every 0.5 s): see keys/cache.py.
    # PostgreSQL keeps many records (a miss is a network round trip); SQLite only the hot
    # keys (a miss costs microseconds). The memory store is already memory.
    lookup: KeyLookup = store
    if store.backend == "postgresql":
        lookup = CachedLookup(store, max_entries=100_000)
    elif store.backend == "sqlite":
        lookup = CachedLookup(store, max_entries=4096)
    auth = KeyAuth(app, store=store, sources=[HeaderKey(), QueryToken(signer, key_in_url_detail=KEY_IN_URL_DETAIL)],
                   lookup=lookup, scopes=SCOPES, realm=REALM)
    usage = UsageRecorder(store, retention=settings.usage_retention)
    # A key refused for a scope it lacks is counted in its hourly usage too (it carries its id).
    auth.on_failure(lambda e: usage.failure(e.code, getattr(e, "key_id", None)))
    app.extensions["keygate.usage"] = usage
    limiter = open_configured_limiter(settings)
    limits = RateLimits(app, auth, limiter, settings.default_rate_limit, usage, settings.ratelimit_fail_open)
    app.extensions["keygate.signer"] = signer
    app.extensions["keygate.close"] = _closer(usage, limiter, store)

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
    from .namespaces import admin_keys, health, pages, tokens

    api.add_namespace(health.ns)
    for ns in [*pages.namespaces(auth), tokens.namespace(auth, signer),
               *admin_keys.namespaces(auth, usage)]:
        api.add_namespace(ns)

    openapi.register(app)  # GET /openapi.json: the full OpenAPI 3.0.3 contract
    register_problem_handlers(app)
    # The console: pages for people, signed in with a key, beside the API (api/console/).
    from .console import init_console

    init_console(app, auth, signer, limits, usage, settings.secret_keys)
    return app
