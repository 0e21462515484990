"""The console: the seed's session login and dashboard, for the people who manage keys.

Server-rendered pages in the style of Flask's tutorial app: a blueprint per area
(``signin``: /login and /logout; ``dashboard``: a key's own page; ``manage``: every key,
for admin keys), Jinja templates extending one ``base.html``, forms posting back to the
view that rendered them. All of them nest in one ``console`` blueprint, whose hooks (the
session, CSRF, the security headers) run for console requests only: the API's requests
never reach them.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response
from flask_wtf.csrf import CSRFProtect, generate_csrf

from keys import KeyAuth
from keys.sessions import Sessions
from keys.tokens import TokenSigner
from keys.usage import UsageRecorder

from ..ratelimits import RateLimits
from .charts import chart_css
from .errors import render_error
from .guard import Console, load_session
from .headers import secure
from .session import ConsoleSessionInterface


def _csrf(app: Flask) -> CSRFProtect:
    """Flask-WTF's CSRFProtect, checked by the console's ``before_request`` only (``protect()``),
    not by ``init_app``'s hook, which every API request would run too."""
    app.config.setdefault("WTF_CSRF_ENABLED", True)
    app.config.setdefault("WTF_CSRF_METHODS", {"POST", "PUT", "PATCH", "DELETE"})
    app.config.setdefault("WTF_CSRF_FIELD_NAME", "csrf_token")
    app.config.setdefault("WTF_CSRF_HEADERS", ["X-CSRFToken", "X-CSRF-Token"])
    # The token lives as long as its session (30 min idle, 12 h at most), not an hour more or less.
    app.config.setdefault("WTF_CSRF_TIME_LIMIT", None)
    # Flask-WTF's strict mode wants a Referer over HTTPS; the console sends Referrer-Policy:
    # no-referrer, so browsers send none. The token, SameSite and form-action do the work.
    app.config.setdefault("WTF_CSRF_SSL_STRICT", False)
    app.jinja_env.globals["csrf_token"] = generate_csrf
    return CSRFProtect()


def init_console(app: Flask, auth: KeyAuth, signer: TokenSigner, limits: RateLimits,
                 usage: UsageRecorder, secret_keys: tuple[str, ...]) -> None:
    from . import dashboard, manage, signin

    state = auth.state(app)
    app.extensions["keygate.console"] = Console(
        auth=auth, signer=signer, limits=limits, usage=usage,
        sessions=Sessions(state.store, state.lookup, secret_keys), csrf=_csrf(app))
    app.session_interface = ConsoleSessionInterface(secret_keys, render_error)

    bp = Blueprint("console", __name__, template_folder="templates", static_folder="static",
                   static_url_path="/dashboard/static")
    bp.before_request(load_session)
    bp.after_request(secure)
    bp.add_url_rule("/dashboard/static/chart.css", "chart_css",
                    lambda: Response(chart_css(), mimetype="text/css"))
    for child in (signin.bp, dashboard.bp, manage.bp):
        bp.register_blueprint(child)
    app.register_blueprint(bp)
