"""What operators point their tools at: ``/readyz`` (load balancers) and ``/metrics``
(Prometheus). ``/healthz``, liveness only, is in ``health.py``."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app
from flask_restx import Namespace

from keys import KeyAuth
from keys.exc import StoreUnavailable
from keys.ratelimit import RateLimitUnavailable

from ..backends import NAMES, STORE
from ..metrics import CONTENT_TYPE, exposition
from ..problems import problem
from ..restx import Resource
from ..scopes import METRICS_READ


def namespaces(auth: KeyAuth) -> list[Namespace]:
    ready = Namespace("ready", path="/readyz", description="Readiness probe")
    metrics = Namespace("metrics", path="/metrics", description="Prometheus metrics (metrics:read scope)")

    @ready.route("")
    class Ready(Resource):
        @ready.doc(security=[])
        def get(self) -> dict[str, Any] | Response:
            """200 while the key store and the rate limiter answer; 503 naming the one that doesn't."""
            results = current_app.extensions["keygate.readiness"].check()
            failing = [name for name, why in results.items() if why is not None]
            if not failing:
                return {"status": "ready", "checks": {name: "ok" for name in results}}
            detail = "; ".join(f"{NAMES[name]} does not answer: {results[name]}" for name in failing)
            # One code per problem: the store's when both are down (nothing works without it).
            # Built here, not raised: the probe has already reported the outage.
            error = (StoreUnavailable if STORE in failing else RateLimitUnavailable)(detail)
            resp = problem(error.status, error.code, error.title, error.detail)
            resp.headers.update(error.headers())
            return resp

    @metrics.route("")
    class Metrics(Resource):
        @metrics.doc(security=[{"apiKey": []}])
        @auth.require(METRICS_READ)
        def get(self) -> Response:
            """Prometheus text exposition, summed over every worker process."""
            extensions = current_app.extensions
            body = exposition(extensions["keygate.metrics"], extensions["keygate.metrics_collector"])
            return current_app.response_class(body, content_type=CONTENT_TYPE)

    return [ready, metrics]
