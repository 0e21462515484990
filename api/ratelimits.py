"""Wiring per-key rate limits, the refused-credential throttle and usage tracking into
the request path."""

from __future__ import annotations

import ipaddress
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flask import Flask, request

from keys import KeyAuth
from keys.auth import PRINCIPAL_ENVIRON_KEY
from keys.exc import AuthenticationError, AuthThrottled, IpNotAllowed, KeygateError, MissingCredentials, RateLimited
from keys.model import Principal
from keys.parse import RateLimit, parse_rate_limit
from keys.ratelimit import Counter, Limiter, LimitState, RateLimitUnavailable
from keys.usage import UsageRecorder

if TYPE_CHECKING:
    from .backends import Backends

#: Where a request's ``LimitState`` is kept (the WSGI environ: the response reads it there).
ENVIRON_KEY = "keygate.rate_limit"
#: The limiter namespace of refused credentials, counted per client address.
AUTH_FAILURE_NAMESPACE = "authfail"


class RateLimits:
    """Flask extension: every request a key makes counts against its limit, refused for
    scope or not; only authorised ones count as uses. With ``auth_failure_limit``, refused
    credentials are limited per client address too: once an address has spent them, every
    credential it sends is answered 429 ``auth_throttled``, whether it would have passed or not."""

    def __init__(self, app: Flask, auth: KeyAuth, limiter: Limiter, default: str,
                 usage: UsageRecorder, fail_open: bool = False, backends: Backends | None = None,
                 auth_failure_limit: str | None = None) -> None:
        self.limiter = limiter
        self.default = parse_rate_limit(default)
        self.usage = usage
        self.fail_open = fail_open
        self.backends = backends
        self.auth_failure_limit = None if auth_failure_limit is None else parse_rate_limit(auth_failure_limit)
        self._guards: dict[str | None, Counter] = {}  # per REMOTE_ADDR: built once, not per request
        auth.after_identification(self._on_request)  # 403s for scope count too
        if self.auth_failure_limit is not None:
            auth.before_refusal(self._on_refusal)
        app.response_class = type("Response", (RateLimitHeaders, app.response_class), {"usage": usage})
        app.extensions["keygate.ratelimits"] = self

    @staticmethod
    @lru_cache(maxsize=256)
    def _parse(text: str) -> RateLimit:
        return parse_rate_limit(text)

    def limit_for(self, principal: Principal) -> RateLimit:
        text = principal.record.rate_limit
        return self.default if text is None else self._parse(text)

    def charge(self, principal: Principal) -> None:
        """Count one request of ``principal``'s key against its limit (``RateLimited`` when it
        is spent): what every API request does, for a console action that changes state."""
        self._on_request(principal)

    def _on_request(self, principal: Principal) -> None:
        environ = request._get_current_object().environ  # type: ignore[attr-defined]  # ~1 µs less than via the proxy
        guard = self._guard(environ)
        try:
            if guard is None:
                throttled, state = None, self.limiter.hit(principal.key_id, self.limit_for(principal))
            else:  # one step: the address's refused credentials checked, the key's hit counted
                throttled, state = self.limiter.hit_unless(principal.key_id, self.limit_for(principal), guard)
        except RateLimitUnavailable as e:
            self._unavailable(e)
            return
        if self.backends is not None:
            self.backends.ok("rate_limiter")
        if throttled is not None or state is None:
            raise self._throttled(throttled)
        environ[ENVIRON_KEY] = state  # for the response's headers, refusal or not
        if not state.allowed:
            self.usage.limited(principal.key_id)
            raise RateLimited(
                f"this key allows {state.limit}; retry in {state.retry_after} s",
                retry_after=state.retry_after,
            )

    def _on_refusal(self, error: KeygateError) -> None:
        """A guess (``invalid_credentials``, a forged ``invalid_token``) spends one of the
        address's refused credentials. Once they are spent, it and every other checked
        credential (a revoked key, an expired token, a key from outside its allow-list) get
        429 instead of what the check found: those would confirm a guess too."""
        guard = self._guard(request.environ)
        if guard is None or not isinstance(error, AuthenticationError | IpNotAllowed) \
                or isinstance(error, MissingCredentials):
            return  # nothing was checked (none or two credentials), or checked with the key's hit
        try:
            if isinstance(error, AuthenticationError) and error.guess:
                state = self.limiter.hit(guard.name, guard.limit, namespace=guard.namespace)
            else:
                state = self.limiter.peek(guard.name, guard.limit, namespace=guard.namespace)
        except RateLimitUnavailable as e:
            self._unavailable(e)
            return
        if not state.allowed:
            raise self._throttled(state)

    def _guard(self, environ: dict[str, Any]) -> Counter | None:
        """The request's client address's counter of refused credentials, if they are limited.
        (``REMOTE_ADDR`` is what ``request.remote_addr`` reads, after ProxyFix.)"""
        limit = self.auth_failure_limit
        if limit is None:
            return None
        remote = environ.get("REMOTE_ADDR")
        guard = self._guards.get(remote)
        if guard is None or guard.limit is not limit:
            if len(self._guards) >= 10_000:
                self._guards.clear()
            guard = self._guards[remote] = Counter(client_address(remote), limit, AUTH_FAILURE_NAMESPACE)
        return guard

    def _throttled(self, state: LimitState | None) -> AuthThrottled:
        if state is None:  # a limiter that broke its contract: throttled, for a second
            return AuthThrottled("too many refused credentials from this address", retry_after=1)
        return AuthThrottled(f"too many refused credentials from this address ({state.limit}); "
                             f"retry in {state.retry_after} s", retry_after=state.retry_after)

    def _unavailable(self, e: RateLimitUnavailable) -> None:
        """The limit store is down: raise the 503, or (fail-open) return to let the request on."""
        if self.backends is not None:  # logged once as the outage starts, once as it ends
            self.backends.failed("rate_limiter", e, "letting requests through (KEYGATE_RATELIMIT_FAIL_OPEN=1)"
                                 if self.fail_open else "refusing requests with 503 (set "
                                 "KEYGATE_RATELIMIT_FAIL_OPEN=1 to let them through)")
        if not self.fail_open:
            raise e


@lru_cache(maxsize=4096)
def client_address(remote: str | None) -> str:
    """The address refused credentials are counted under: an IPv4 address as it is, an
    IPv6 one by its /64 (one subscriber's usual allocation: per /128 it could rotate
    addresses for free), an IPv4-mapped IPv6 one as the IPv4 address."""
    if not remote:
        return "-"  # no peer address (a Unix socket): one counter for all
    if ":" not in remote:
        return remote[:64]  # an IPv4 address (or, from a trusted proxy, whatever it said)
    try:
        address = ipaddress.IPv6Address(remote.split("%", 1)[0])
    except ValueError:
        return remote[:64]
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class RateLimitHeaders:
    """Response mixin: the rate-limit headers of the request's hit (every response to a
    limited key, whatever built it), appended to the WSGI header list as it is sent — and,
    once the answer is known, the use: an authorised request answered below 400 counts
    (``use_count``, the hour's accepted); one refused for its body or failed by the server
    (a 503 when the store went away mid-request) does not.

    ``resp.headers[...] = …`` checks every value for line breaks and rewrites the
    list (4 µs for five headers, per request); these values are numbers keygate
    formats itself, so they are appended as they are (0.6 µs). Counting here, not in an
    after-request hook, spares every request Flask's hook dispatch.
    """

    usage: UsageRecorder  # set on the app's response class by ``RateLimits``
    status_code: int

    def get_wsgi_response(self, environ: dict[str, Any]) -> tuple[Any, str, list[tuple[str, str]]]:
        app_iter, status, headers = super().get_wsgi_response(environ)  # type: ignore[misc]
        state = environ.get(ENVIRON_KEY)
        if state is not None:
            headers.extend(header_items(state))
        principal = environ.get(PRINCIPAL_ENVIRON_KEY)
        if principal is not None and self.status_code < 400:
            self.usage.hit(principal.key_id)
        return app_iter, status, headers


def header_items(state: LimitState) -> list[tuple[str, str]]:
    """The IETF draft's ``RateLimit-Policy``/``RateLimit`` and the widely used
    ``X-RateLimit-*`` (reset as a Unix time), for one hit."""
    policy, amount = _policy(state.limit)
    remaining = str(state.remaining)
    return [
        ("RateLimit-Policy", policy),
        ("RateLimit", f'"key";r={remaining};t={state.reset}'),
        ("X-RateLimit-Limit", amount),
        ("X-RateLimit-Remaining", remaining),
        ("X-RateLimit-Reset", str(int(time.time()) + state.reset)),
    ]


@lru_cache(maxsize=256)
def _policy(limit: RateLimit) -> tuple[str, str]:
    """The ``RateLimit-Policy`` and ``X-RateLimit-Limit`` values: the same for every hit."""
    return f'"key";q={limit.amount};w={limit.period}', str(limit.amount)
