"""Wiring per-key rate limits and usage tracking into the request path."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from flask import Flask, request

from keys import KeyAuth
from keys.exc import RateLimited
from keys.model import Principal
from keys.parse import RateLimit, parse_rate_limit
from keys.ratelimit import Limiter, LimitState, RateLimitUnavailable
from keys.usage import UsageRecorder

if TYPE_CHECKING:
    from .backends import Backends

#: Where a request's ``LimitState`` is kept (the WSGI environ: the response reads it there).
ENVIRON_KEY = "keygate.rate_limit"


class RateLimits:
    """Flask extension: every request a key makes counts against its limit, refused for
    scope or not; only authorised ones count as uses."""

    def __init__(self, app: Flask, auth: KeyAuth, limiter: Limiter, default: str,
                 usage: UsageRecorder, fail_open: bool = False, backends: Backends | None = None) -> None:
        self.limiter = limiter
        self.default = parse_rate_limit(default)
        self.usage = usage
        self.fail_open = fail_open
        self.backends = backends
        auth.after_identification(self._on_request)  # 403s for scope count too
        auth.after_authentication(self._on_authorised)
        app.response_class = type("Response", (RateLimitHeaders, app.response_class), {})
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
        try:
            state = self.limiter.hit(principal.key_id, self.limit_for(principal))
        except RateLimitUnavailable as e:
            if self.backends is not None:  # logged once as the outage starts, once as it ends
                self.backends.failed("rate_limiter", e, "letting requests through (KEYGATE_RATELIMIT_FAIL_OPEN=1)"
                                     if self.fail_open else "refusing requests with 503 (set "
                                     "KEYGATE_RATELIMIT_FAIL_OPEN=1 to let them through)")
            if not self.fail_open:
                raise
            return
        if self.backends is not None:
            self.backends.ok("rate_limiter")
        request.environ[ENVIRON_KEY] = state  # for the response's headers, refusal or not
        if not state.allowed:
            self.usage.limited(principal.key_id)
            raise RateLimited(
                f"this key allows {state.limit}; retry in {state.retry_after} s",
                retry_after=state.retry_after,
            )

    def _on_authorised(self, principal: Principal) -> None:
        self.usage.hit(principal.key_id)  # use_count counts what the key was let do


class RateLimitHeaders:
    """Response mixin: the rate-limit headers of the request's hit (every response to a
    limited key, whatever built it), appended to the WSGI header list as it is sent.

    ``resp.headers[...] = …`` checks every value for line breaks and rewrites the
    list (4 µs for five headers, per request); these values are numbers keygate
    formats itself, so they are appended as they are (0.6 µs).
    """

    def get_wsgi_response(self, environ: dict[str, Any]) -> tuple[Any, str, list[tuple[str, str]]]:
        app_iter, status, headers = super().get_wsgi_response(environ)  # type: ignore[misc]
        state = environ.get(ENVIRON_KEY)
        if state is not None:
            headers.extend(header_items(state))
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
