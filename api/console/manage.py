"""Managing every key, for admin keys: list and filter, create, edit, revoke, rotate, usage,
the audit trail and the failed-authentication counts."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from keys import get_key, issue_key, revoke_key
from keys.exc import InvalidRequest
from keys.issuing import rotate_key, update_key
from keys.keyformat import is_key_id
from keys.model import KEY_STATES, KeyFilter

from ..scopes import ALL_SCOPES, SCOPES
from .dashboard import _forget_cached_keys
from .guard import actor, admin_required, charge, console
from .views import GRACE_CHOICES, facts, form_choice, form_duration, form_networks, usage

bp = Blueprint("manage", __name__, url_prefix="/dashboard")
PAGE = 50


def _store() -> Any:
    return console().auth.store


def _key_or_404(key_id: str) -> Any:
    return get_key(_store(), key_id)


def _filter() -> KeyFilter:
    name = request.args.get("name", "").strip()[:100] or None
    scope = request.args.get("scope") or None
    state = request.args.get("state") or None
    if scope is not None and scope not in ALL_SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(ALL_SCOPES)}", field="scope")
    if state is not None and state not in KEY_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(KEY_STATES)}", field="state")
    return KeyFilter(name=name, scope=scope, state=state, now=time.time())


@bp.get("/keys")
@admin_required
def keys() -> ResponseReturnValue:
    where = _filter()
    after = request.args.get("after") or None
    if after is not None and not is_key_id(after):
        raise InvalidRequest("after must be a key id", field="after")
    page = _store().list_keys(limit=PAGE, after=after, where=where)
    nxt = page[-1].id if len(page) == PAGE else None
    return render_template("console/keys.html", keys=[facts(k) for k in page], where=where, next=nxt,
                           scopes=ALL_SCOPES, states=KEY_STATES)


def _form_values(record: Any = None) -> dict[str, Any]:
    """What a create or edit form shows: what was typed, else the key's values."""
    if request.method == "POST":
        return {"name": request.form.get("name", ""), "scopes": request.form.getlist("scope"),
                "rate_limit": request.form.get("rate_limit", ""), "expires_in": request.form.get("expires_in", ""),
                "allowed_ips": request.form.get("allowed_ips", ""), "no_expiry": "no_expiry" in request.form}
    if record is None:
        return {"name": "", "scopes": [], "rate_limit": "", "expires_in": "", "allowed_ips": "", "no_expiry": False}
    return {"name": record.name, "scopes": list(record.scopes), "rate_limit": record.rate_limit or "",
            "expires_in": "", "allowed_ips": "\n".join(record.allowed_ips), "no_expiry": False}


@bp.route("/keys/new", methods=["GET", "POST"])
@admin_required
def create() -> ResponseReturnValue:
    if request.method == "POST":
        charge()
        try:
            issued = issue_key(
                _store(), name=request.form.get("name", ""), scopes=request.form.getlist("scope"),
                expires_in=form_duration("expires_in", "expires in"),
                rate_limit=request.form.get("rate_limit", "").strip() or None,
                allowed_ips=form_networks(), actor=actor(), vocabulary=SCOPES)
        except InvalidRequest as e:
            return render_template("console/key_form.html", values=_form_values(), scopes=ALL_SCOPES,
                                   error=e, key=None), 400
        # The new key, once: this page is the only place it will ever be shown.
        return render_template("console/key_created.html", key=facts(issued.record), plaintext=issued.plaintext,
                               replaced=None, own=False)
    return render_template("console/key_form.html", values=_form_values(), scopes=ALL_SCOPES, key=None)


@bp.get("/keys/<key_id>")
@admin_required
def detail(key_id: str) -> ResponseReturnValue:
    record = _key_or_404(key_id)
    events = _store().events(key_id=key_id, limit=20)
    return render_template("console/key.html", key=facts(record), usage=usage(record), events=events)


@bp.route("/keys/<key_id>/edit", methods=["GET", "POST"])
@admin_required
def edit(key_id: str) -> ResponseReturnValue:
    record = _key_or_404(key_id)
    if request.method == "POST":
        charge()
        edits: dict[str, Any] = {
            "name": request.form.get("name", ""), "scopes": request.form.getlist("scope"),
            "rate_limit": request.form.get("rate_limit", "").strip() or None, "allowed_ips": form_networks(),
        }
        try:
            if "no_expiry" in request.form:
                edits["expires_in"] = None
            elif request.form.get("expires_in", "").strip():
                edits["expires_in"] = form_duration("expires_in", "expires in")
            update_key(_store(), key_id, edits, actor=actor(), vocabulary=SCOPES)
        except InvalidRequest as e:
            return render_template("console/key_form.html", values=_form_values(record), scopes=ALL_SCOPES,
                                   error=e, key=facts(record)), 400
        _forget_cached_keys()
        return redirect(url_for(".detail", key_id=key_id), 303)
    return render_template("console/key_form.html", values=_form_values(record), scopes=ALL_SCOPES,
                           key=facts(record))


@bp.route("/keys/<key_id>/revoke", methods=["GET", "POST"])
@admin_required
def revoke(key_id: str) -> ResponseReturnValue:
    record = _key_or_404(key_id)
    if request.method == "GET":
        return render_template("console/revoke.html", key=facts(record), own=False,
                               action=url_for(".revoke", key_id=key_id), back=url_for(".detail", key_id=key_id))
    charge()
    revoke_key(_store(), key_id, actor=actor())
    _forget_cached_keys()
    return redirect(url_for(".detail", key_id=key_id), 303)


@bp.route("/keys/<key_id>/rotate", methods=["GET", "POST"])
@admin_required
def rotate(key_id: str) -> ResponseReturnValue:
    record = _key_or_404(key_id)
    if request.method == "GET":
        return render_template("console/rotate.html", key=facts(record), graces=GRACE_CHOICES,
                               action=url_for(".rotate", key_id=key_id), back=url_for(".detail", key_id=key_id))
    charge()
    issued = rotate_key(_store(), key_id, grace=form_choice("grace", GRACE_CHOICES) or None, actor=actor())
    _forget_cached_keys()
    return render_template("console/key_created.html", key=facts(issued.record), plaintext=issued.plaintext,
                           replaced=key_id, own=False)


@bp.get("/audit")
@admin_required
def audit() -> ResponseReturnValue:
    key_id = request.args.get("key_id", "").strip() or None
    event = request.args.get("event", "").strip() or None
    if key_id is not None and not is_key_id(key_id):
        raise InvalidRequest("key_id must be a key id", field="key_id")
    if event is not None and (len(event) > 32 or not event.replace("_", "").isalnum()):
        raise InvalidRequest("event must be an event name such as create or console_login", field="event")
    before = request.args.get("before", "")
    if before and not (before.isascii() and before.isdigit() and len(before) < 19):
        raise InvalidRequest("before must be an event id", field="before")
    events = _store().events(key_id=key_id, event=event, limit=PAGE, before=int(before) if before else None)
    failures = _store().auth_failures()
    for code, n in console().usage.pending_failures().items():  # this process's, not yet written
        failures[code] = failures.get(code, 0) + n
    return render_template("console/audit.html", events=events, failures=sorted(failures.items()),
                           key_id=key_id or "", event=event or "",
                           next=events[-1].id if len(events) == PAGE else None)

