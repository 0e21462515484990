"""The signed-in key's own page: what it is, how it has been used, a query token for what it
holds, and rotating or revoking itself (a leaked key needn't wait for an admin)."""

from __future__ import annotations

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from keys.exc import KeygateError
from keys.issuing import revoke_key, rotate_key
from keys.model import isoformat
from keys.tokens import mint_token

from .guard import actor, charge, console, current_session, is_admin, login_required, principal
from .views import GRACE_CHOICES, TTL_CHOICES, facts, form_choice, usage

bp = Blueprint("dashboard", __name__)


def _ttls() -> list[tuple[int, str]]:
    return [(ttl, label) for ttl, label in TTL_CHOICES if ttl <= console().signer.max_ttl]


def _page(status: int = 200, **extra: object) -> ResponseReturnValue:
    key = principal().record
    return render_template("console/dashboard.html", key=facts(key), usage=usage(key), admin=is_admin(),
                           scopes=key.scopes, ttls=_ttls(), **extra), status


@bp.get("/dashboard")
@login_required
def home() -> ResponseReturnValue:
    return _page()


@bp.post("/dashboard/token")
@login_required
def token() -> ResponseReturnValue:
    charge()
    key = principal().record
    try:
        scopes = request.form.getlist("scope") or None
        minted = mint_token(console().auth.store, console().signer, key, actor=actor(), scopes=scopes,
                            ttl=form_choice("ttl", tuple(_ttls())))
    except KeygateError as e:
        if e.status >= 500:
            raise
        return _page(e.status, token_error=e)
    return render_template("console/token.html", token=minted.token, scopes=minted.scopes,
                           expires_at=isoformat(minted.expires_at),
                           data_url=url_for("data_data", token=minted.token))


@bp.route("/dashboard/rotate", methods=["GET", "POST"])
@login_required
def rotate() -> ResponseReturnValue:
    key = principal().record
    if request.method == "GET":
        return render_template("console/rotate.html", key=facts(key), graces=GRACE_CHOICES,
                               action=url_for(".rotate"), back=url_for(".home"))
    charge()
    issued = rotate_key(console().auth.store, key.id, grace=form_choice("grace", GRACE_CHOICES) or None,
                        actor=actor())
    _forget_cached_keys()
    return render_template("console/key_created.html", key=facts(issued.record), plaintext=issued.plaintext,
                           replaced=key.id, own=True)


@bp.route("/dashboard/revoke", methods=["GET", "POST"])
@login_required
def revoke() -> ResponseReturnValue:
    key = principal().record
    if request.method == "GET":
        return render_template("console/revoke.html", key=facts(key), own=True,
                               action=url_for(".revoke"), back=url_for(".home"))
    charge()
    revoke_key(console().auth.store, key.id, actor=actor())
    _forget_cached_keys()
    s = current_session()
    if s.reference is not None:
        console().sessions.end(s.reference)
    s.ended()  # the key is gone, and the session with it
    return redirect(url_for("console.signin.login", revoked=1), 303)


def _forget_cached_keys() -> None:
    """This process stops accepting the old key at once; others within the cache's bound."""
    clear = getattr(console().auth.lookup, "clear", None)
    if clear is not None:
        clear()
