"""Wiring per-key rate limits and usage tracking into the request path."""

from __future__ import annotations

import logging
import time
from functools import lru_cache

from flask import Flask, Response, g

from keys import KeyAuth
from keys.exc import RateLimited
from keys.model import Principal
from keys.parse import RateLimit, parse_rate_limit
from keys.ratelimit import Limiter, RateLimitUnavailable
from keys.usage import UsageRecorder

log = logging.getLogger("keygate.ratelimit")


class RateLimits:
    """Flask extension: every authorised request counts against its key's limit."""

    def __init__(self, app: Flask, auth: KeyAuth, limiter: Limiter, default: str,
                 usage: UsageRecorder, fail_open: bool = False) -> None:
        self.limiter = limiter
        self.default = parse_rate_limit(default)
        self.usage = usage
        self.fail_open = fail_open
        self._last_outage_log = 0.0
        auth.after_authentication(self._on_request)
        app.after_request(self._headers)
        app.extensions["keygate.ratelimits"] = self

    @staticmethod
    @lru_cache(maxsize=256)
    def _parse(text: str) -> RateLimit:
        return parse_rate_limit(text)

    def limit_for(self, principal: Principal) -> RateLimit:
        text = principal.record.rate_limit
        return self.default if text is None else self._parse(text)

    def _on_request(self, principal: Principal) -> None:
        try:
            state = self.limiter.hit(principal.key_id, self.limit_for(principal))
        except RateLimitUnavailable as e:
            self._log_outage(e)
            if not self.fail_open:
                raise
            self.usage.hit(principal.key_id)
            return
        g.rate_limit = state
        if not state.allowed:
            raise RateLimited(
                f"this key allows {state.limit}; retry in {state.retry_after} s",
                retry_after=state.retry_after,
            )
        self.usage.hit(principal.key_id)

    def _log_outage(self, e: Exception) -> None:
        now = time.monotonic()
        if now - self._last_outage_log > 10:  # one line per 10 s, not one per request
            self._last_outage_log = now
            action = "letting requests through (KEYGATE_RATELIMIT_FAIL_OPEN=1)" if self.fail_open \
                else "refusing requests with 503 (set KEYGATE_RATELIMIT_FAIL_OPEN=1 to let them through)"
            log.error("rate-limit store unavailable (%s); %s", e.__cause__ or e, action)

    @staticmethod
    def _headers(resp: Response) -> Response:
        state = g.get("rate_limit")
        if state is not None:
            h = resp.headers
            h["RateLimit-Policy"] = f'"key";q={state.limit.amount};w={state.limit.period}'
            h["RateLimit"] = f'"key";r={state.remaining};t={state.reset}'
            h["X-RateLimit-Limit"] = str(state.limit.amount)
            h["X-RateLimit-Remaining"] = str(state.remaining)
            h["X-RateLimit-Reset"] = str(int(time.time()) + state.reset)
        return resp
