from flask_restx import Namespace

from ..restx import Resource

ns = Namespace("health", path="/healthz", description="Liveness probe")


@ns.route("")
class Health(Resource):
    @ns.doc(security=[])
    def get(self) -> dict[str, str]:
        """Always 200 while the process serves."""
        return {"status": "ok"}
