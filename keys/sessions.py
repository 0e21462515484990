"""Sessions a person signs in to with a key, held by the store and named by a signed reference.

The browser holds a reference: a random session id, signed with itsdangerous so
that a forged one is refused without asking the store. The store holds only the
id's SHA-256, the key's id and two times, never the key or its scopes: each use
of the session looks the key up again through the same lookup verification uses
(``CachedLookup``, revalidated every 0.5 s), so a session stops working within
the same bound as the key itself when it is revoked, expires, or its rotation's
grace runs out, and the key's allow-list applies to every use.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence

from itsdangerous import BadSignature, URLSafeSerializer

from .exc import AuthenticationError
from .model import KeyRecord, SessionRecord
from .store.base import KeyStore
from .verify import KeyLookup, check_ip, check_live

SALT = "keygate.console-session.v1"
#: A session unused this long has ended (seconds).
IDLE_TIMEOUT = 30 * 60
#: A session this old has ended, however busy (seconds).
ABSOLUTE_TIMEOUT = 12 * 3600
#: A session's last use is written at most this often (seconds): one write a minute,
#: not one per page, and the idle timeout is still kept to the minute.
TOUCH_EVERY = 60


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """Starts, resumes and ends sessions in ``store``; keys are read through ``lookup``."""

    def __init__(self, store: KeyStore, lookup: KeyLookup, secret_keys: Sequence[str], *,
                 idle_timeout: float = IDLE_TIMEOUT, absolute_timeout: float = ABSOLUTE_TIMEOUT) -> None:
        if not secret_keys:
            raise ValueError("at least one secret key is required")
        self.store = store
        self.lookup = lookup
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        # itsdangerous signs with the last secret and verifies with all: the first configured signs.
        self._serializer = URLSafeSerializer(list(reversed(secret_keys)), salt=SALT)

    def start(self, record: KeyRecord, now: float | None = None) -> tuple[str, SessionRecord]:
        """A new session (a new id, always: no fixation) for a key the caller has just
        verified; returns the signed reference for the browser and the stored session.
        Sessions that have ended are purged on the way."""
        now = time.time() if now is None else now
        self.store.purge_sessions(now - self.idle_timeout, now - self.absolute_timeout)
        session_id = secrets.token_urlsafe(32)
        session = SessionRecord(_hash(session_id), record.id, now, now, secrets.token_hex(32))
        self.store.add_session(session)
        return self._serializer.dumps(session_id), session

    def _find(self, reference: str) -> SessionRecord | None:
        try:
            session_id = self._serializer.loads(reference)
        except BadSignature:
            return None
        if not isinstance(session_id, str):
            return None
        return self.store.get_session(_hash(session_id))

    def resume(self, reference: str, address: str | None,
               now: float | None = None) -> tuple[SessionRecord, KeyRecord] | None:
        """The live session ``reference`` names and its key's current record; ``None`` when
        there is none (forged, ended, timed out). A key now revoked or expired raises its
        ``AuthenticationError`` (the session is ended), an address outside the key's
        allow-list ``IpNotAllowed`` (the session is kept, for the right address)."""
        now = time.time() if now is None else now
        session = self._find(reference)
        if session is None:
            return None
        if now - session.last_seen_at > self.idle_timeout or now - session.created_at > self.absolute_timeout:
            self.store.delete_session(session.id_hash)
            return None
        record = self.lookup.get(session.key_id)
        if record is None:
            self.store.delete_session(session.id_hash)
            return None
        try:
            check_live(record, now)
        except AuthenticationError:
            self.store.delete_session(session.id_hash)
            raise
        if record.allowed_ips:
            check_ip(record, address)
        if now - session.last_seen_at >= TOUCH_EVERY:
            self.store.touch_session(session.id_hash, now)
        return session, record

    def end(self, reference: str) -> SessionRecord | None:
        """End the session ``reference`` names (sign-out); the ended session, if there was one."""
        session = self._find(reference)
        if session is not None:
            self.store.delete_session(session.id_hash)
        return session
