"""Signing in with a key (checked exactly as the API checks it) and signing out."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from keys.exc import KeygateError
from keys.keyformat import is_key_id, parse_key

from .errors import prefers_json
from .guard import audit, console, current_session, signed_in_key

bp = Blueprint("signin", __name__)


def _claimed_id(value: str) -> str:
    """The key id a pasted value claims, for the audit trail of a refused sign-in; ``-`` if none."""
    try:
        key_id = parse_key(value).key_id
    except KeygateError:
        return "-"
    return key_id if is_key_id(key_id) else "-"


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        if signed_in_key() is not None:
            return redirect(url_for("console.dashboard.home"), 303)
        return render_template("console/login.html")
    value = request.form.get("api_key", "").strip()
    try:
        # The API's own path: the same refusals, allow-list, failure counters and throttles,
        # and the sign-in counts against the key's rate limit.
        who = console().auth.authenticate(None, accept=("header",), presented=value)
    except KeygateError as e:
        if e.status != 429:  # a throttled attempt checked no credential: counted, not audited
            claimed = _claimed_id(value)
            audit("console_login_refused", claimed, {"code": e.code}, who=f"console:{claimed}")
        if prefers_json():
            raise
        return render_template("console/login.html", error=e), e.status, e.headers()
    reference, record = console().sessions.start(who.record)
    current_session().signed_in(reference, record, who.record)
    audit("console_login", who.key_id)
    return redirect(url_for("console.dashboard.home"), 303)


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    s = current_session()
    key = s.key
    if s.reference is not None:
        console().sessions.end(s.reference)
    s.ended()
    if key is not None:
        audit("console_logout", key.id, who=f"console:{key.id}")
    return redirect(url_for("console.signin.login"), 303)
