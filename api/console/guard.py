"""Who is signed in to the console, and what they may do: every console request resumes
its session here (the key is looked up again, its allow-list applied), then forms are
checked for their CSRF token."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app, redirect, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFProtect

from keys import KeyAuth
from keys.exc import AuthenticationError, InsufficientScope
from keys.model import AuditEvent, KeyRecord, Principal
from keys.sessions import Sessions
from keys.tokens import TokenSigner
from keys.usage import UsageRecorder

from ..bodies import MAX_BODY
from ..ratelimits import RateLimits
from ..scopes import ADMIN, SCOPES
from .session import ConsoleSession

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(eq=False)
class Console:
    """What the console's views use, kept in ``app.extensions["keygate.console"]``."""

    auth: KeyAuth
    signer: TokenSigner
    limits: RateLimits
    usage: UsageRecorder
    sessions: Sessions
    csrf: CSRFProtect


def console() -> Console:
    state: Console = current_app.extensions["keygate.console"]
    return state


def current_session() -> ConsoleSession:
    assert isinstance(session, ConsoleSession)  # the console's paths always have one
    return session


def signed_in_key() -> KeyRecord | None:
    return current_session().key if isinstance(session, ConsoleSession) else None


def principal() -> Principal:
    """The signed-in key, as a caller: what rate limits and the audit trail see."""
    key = current_session().key
    assert key is not None
    return Principal(key.id, key.name, key.scopes, "session", key)


def actor() -> str:
    """``console:<key id>``: who acted, in the audit trail."""
    return f"console:{principal().key_id}"


def audit(event: str, key_id: str, detail: dict[str, Any] | None = None, *, who: str | None = None) -> None:
    console().auth.store.record_event(AuditEvent(event, key_id, who or actor(), time.time(), detail or {}))


def is_admin(key: KeyRecord | None = None) -> bool:
    key = key or current_session().key
    return key is not None and SCOPES.grants(key.scopes, ADMIN)


def load_session() -> ResponseReturnValue | None:
    """Every console request, before its view: resume the session (a key revoked, expired or
    past its grace ends it), apply the key's allow-list, then check a form's CSRF token."""
    if not isinstance(session, ConsoleSession):
        return None  # the stylesheet and script
    # A form is a few hundred bytes: one bigger than the API's body limit is refused (413)
    # before werkzeug reads it, for this request only (the app-wide setting is the API's).
    request.max_content_length = MAX_BODY
    s = current_session()
    if s.reference is not None:
        try:
            resumed = console().sessions.resume(s.reference, request.remote_addr)
        except AuthenticationError:
            resumed = None  # the key stopped working: so did the session
        if resumed is None:
            s.ended()
        else:
            s.resumed(*resumed)
    if request.method == "POST":
        if request.endpoint == "console.signin.logout" and s.key is None:
            return redirect(url_for("console.signin.login"), 303)  # nothing left to end
        console().csrf.protect()
    return None


def login_required(view: F) -> F:
    """The seed's rule: no session, 303 to /login."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if signed_in_key() is None:
            return redirect(url_for("console.signin.login"), 303)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def admin_required(view: F) -> F:
    """Signed in with a key holding ``admin``; any other key: 403."""

    @functools.wraps(view)
    @login_required
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not is_admin():
            raise InsufficientScope("managing keys needs the 'admin' scope", scope=ADMIN)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def charge() -> None:
    """A change made in the console counts against the key's rate limit, like an API request."""
    console().limits.charge(principal())
