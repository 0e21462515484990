"""The console's Flask session: a server-side session for signed-in people, and a signed
pre-session cookie that carries the sign-in form's CSRF secret.

Flask opens a session for every request; the API has none (a cookie session cost ~18 µs
a request, bench/), so this interface answers ``None`` (Flask's read-only null session)
for every path outside the console, after one string comparison. On console paths it
only reads cookies: resuming the session (a store read, the key's checks) happens in the
console's ``before_request`` (``guard.load_session``), where a refusal can be answered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, Request, Response
from flask import request as current_request
from flask.sessions import SessionInterface, SessionMixin
from itsdangerous import BadSignature, URLSafeSerializer
from werkzeug.datastructures import CallbackDict

from keys.model import KeyRecord, SessionRecord

from ..problems import ERROR_RENDERER_ENVIRON_KEY

#: Paths whose requests are the console's (``/dashboard/…`` too).
CONSOLE_PATHS = frozenset({"/login", "/logout", "/dashboard"})
CONSOLE_PREFIX = "/dashboard/"
STATIC_PREFIX = "/dashboard/static/"
SESSION_COOKIE = "keygate_session"
PRESESSION_COOKIE = "keygate_signin"
PRESESSION_SALT = "keygate.console-presession.v1"
#: The WSGI environ key marking a console request (its errors are pages).
CONSOLE_ENVIRON_KEY = "keygate.console"


def is_console_path(path: str) -> bool:
    return path in CONSOLE_PATHS or path.startswith(CONSOLE_PREFIX)


def cookie_name(base: str, secure: bool) -> str:
    """``__Host-`` under HTTPS: the browser then insists on Secure, Path=/ and no Domain, so
    no other host or plain-HTTP page can set it (RFC 6265bis §4.1.3.2)."""
    return f"__Host-{base}" if secure else base


class ConsoleSession(CallbackDict[str, Any], SessionMixin):
    """What ``flask.session`` is on a console request: its data (Flask-WTF's CSRF secret),
    and, once ``guard.load_session`` has resumed it, the server-side session and its key."""

    def __init__(self, reference: str | None, presession: dict[str, Any]) -> None:
        def on_update(_: Any) -> None:
            self.modified = True

        super().__init__(presession, on_update)
        self.modified = False
        #: The signed reference the browser sent (or was just given at sign-in).
        self.reference = reference
        self.record: SessionRecord | None = None
        self.key: KeyRecord | None = None
        #: Set at sign-in and sign-out: the response sets (or clears) the session cookie.
        self.reference_changed = False

    def signed_in(self, reference: str, record: SessionRecord, key: KeyRecord) -> None:
        self.reference, self.record, self.key = reference, record, key
        self.reference_changed = True
        self.clear()
        self["csrf_token"] = record.csrf_secret  # the signed-in session's own CSRF secret

    def resumed(self, record: SessionRecord, key: KeyRecord) -> None:
        self.record, self.key = record, key
        dict.__setitem__(self, "csrf_token", record.csrf_secret)  # not a change to save

    def ended(self) -> None:
        self.reference, self.record, self.key = None, None, None
        self.reference_changed = True
        self.clear()


class ConsoleSessionInterface(SessionInterface):
    """Sessions on console paths only; ``render_error`` answers the console's errors."""

    def __init__(self, secret_keys: tuple[str, ...], render_error: Callable[[BaseException], Response]) -> None:
        self._presession = URLSafeSerializer(list(reversed(secret_keys)), salt=PRESESSION_SALT)
        self._render_error = render_error

    def open_session(self, app: Flask, request: Request) -> ConsoleSession | None:  # type: ignore[override]
        environ = request.environ
        path = environ.get("PATH_INFO", "")
        if not (path in CONSOLE_PATHS or path.startswith(CONSOLE_PREFIX)):
            return None  # the API: Flask's null session, as before the console
        environ[CONSOLE_ENVIRON_KEY] = True
        environ[ERROR_RENDERER_ENVIRON_KEY] = self._render_error
        if path.startswith(STATIC_PREFIX):
            return None  # a stylesheet needs no session
        secure = request.is_secure
        presession: dict[str, Any] = {}
        raw = request.cookies.get(cookie_name(PRESESSION_COOKIE, secure))
        if raw:
            try:
                loaded = self._presession.loads(raw)
                if isinstance(loaded, dict):
                    presession = {k: v for k, v in loaded.items() if k == "csrf_token" and isinstance(v, str)}
            except BadSignature:
                pass  # a forged or stale one: a new one is made
        return ConsoleSession(request.cookies.get(cookie_name(SESSION_COOKIE, secure)) or None, presession)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, ConsoleSession):
            return
        secure = current_request.is_secure
        flags: dict[str, Any] = {"httponly": True, "samesite": "Lax", "secure": secure, "path": "/"}
        response.vary.add("Cookie")
        if session.reference_changed:
            name = cookie_name(SESSION_COOKIE, secure)
            if session.reference is None:
                response.delete_cookie(name, **flags)
            else:
                response.set_cookie(name, session.reference, **flags)
                response.delete_cookie(cookie_name(PRESESSION_COOKIE, secure), **flags)
            return
        if session.record is None and session.modified and "csrf_token" in session:
            response.set_cookie(cookie_name(PRESESSION_COOKIE, secure),
                                self._presession.dumps({"csrf_token": session["csrf_token"]}), **flags)
