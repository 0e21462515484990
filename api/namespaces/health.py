"""``/healthz``: liveness only (readiness, with the dependencies, is ``/readyz``)."""

from flask_restx import Namespace

from ..restx import Resource


def namespace() -> Namespace:
    """A new namespace for each app, never a module-level one: a Namespace keeps every Api it
    was added to, so a module-level one kept every app ever built alive (a test suite's)."""
    ns = Namespace("health", path="/healthz", description="Liveness probe")

    @ns.route("")
    class Health(Resource):
        @ns.doc(security=[])
        def get(self) -> dict[str, str]:
            """Always 200 while the process serves."""
            return {"status": "ok"}

    return ns
