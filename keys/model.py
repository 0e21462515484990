"""What the store keeps about a key, and who a verified caller is."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

#: A key's state at a given moment: ``grace`` is a rotated key still accepted until ``revoked_at``.
KeyState = Literal["active", "grace", "revoked", "expired"]


def isoformat(ts: float | None) -> str | None:
    """Epoch seconds → ISO 8601 UTC with a ``Z`` (``None`` stays ``None``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


#: The longest actor the audit trail stores (its column's width).
ACTOR_LENGTH = 120


def escape_unprintable(text: str) -> str:
    """``text`` with every character ``str.isprintable`` refuses (controls, line breaks,
    bidi overrides, ...) written as a Python escape: ``"a\nb"`` → ``"a\\x0ab"``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class KeyRecord(NamedTuple):
    """One stored key. Holds the hash of the secret, never the secret.

    Times are epoch seconds (floats): cheap to compare on the hot path and
    identical on every store backend. ``revoked_at`` may lie in the future:
    that is a rotation's grace period. A NamedTuple, not a frozen dataclass:
    one is built per request, and this builds ~10× faster.
    """

    id: str
    name: str
    key_hash: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    use_count: int = 0
    rate_limit: str | None = None
    allowed_ips: tuple[str, ...] = ()
    replaces: str | None = None
    generation: int = 0

    def replace(self, **changes: Any) -> KeyRecord:
        return self._replace(**changes)

    def state(self, now: float | None = None) -> KeyState:
        """What verification would make of the key at ``now``: the same order as
        ``verify.check_live`` (a revocation that has happened wins over an expiry)."""
        now = time.time() if now is None else now
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active" if self.revoked_at is None else "grace"

    def metadata(self, now: float | None = None, default_rate_limit: str | None = None) -> dict[str, Any]:
        """The public view: everything but the hash, timestamps as ISO 8601, the ``state``
        at ``now``, and ``rate_limit`` in force: the key's own, else ``default_rate_limit``
        (the app's default, which the record doesn't know)."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "state": self.state(now),
            "created_at": isoformat(self.created_at),
            "expires_at": isoformat(self.expires_at),
            "revoked_at": isoformat(self.revoked_at),
            "last_used_at": isoformat(self.last_used_at),
            "use_count": self.use_count,
            "rate_limit": self.rate_limit if self.rate_limit is not None else default_rate_limit,
            "allowed_ips": list(self.allowed_ips),
            "replaces": self.replaces,
        }


class Principal(NamedTuple):
    """The verified caller of one request, as put on ``flask.g.principal``."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    via: str  # "header" or "token"
    record: KeyRecord


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One lifecycle event. Never holds a secret: ids, names and settings only."""

    event: str  # "create", "revoke", "rotate", "mint_token"
    key_id: str
    actor: str  # "key:<admin key id>" or "cli:<os user>"
    at: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        # The actor comes from outside (an OS user name, LOGNAME): stored escaped, so it can't
        # forge a line of an audit listing or carry an escape sequence into a terminal.
        object.__setattr__(self, "actor", escape_unprintable(self.actor)[:ACTOR_LENGTH])

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": isoformat(self.at),
            "event": self.event,
            "key_id": self.key_id,
            "actor": self.actor,
            "detail": self.detail,
        }


#: Every value ``KeyRecord.state`` returns, in the order a person reads them.
KEY_STATES = ("active", "grace", "revoked", "expired")


class KeyFilter(NamedTuple):
    """Which keys a listing shows: a name containing ``name`` (ASCII letters in any case), holding ``scope``
    (literally), in ``state`` at ``now``. ``None`` matches everything."""

    name: str | None = None
    scope: str | None = None
    state: str | None = None
    now: float = 0.0

    def matches(self, record: KeyRecord) -> bool:
        return ((self.name is None or self.name.lower() in record.name.lower())
                and (self.scope is None or self.scope in record.scopes)
                and (self.state is None or record.state(self.now) == self.state))


class UsageBucket(NamedTuple):
    """One key's requests in one period starting at ``start`` (epoch seconds, UTC):
    accepted, refused by its rate limit, refused for a scope it lacks."""

    start: float
    accepted: int = 0
    refused_limit: int = 0
    refused_scope: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"start": isoformat(self.start), "accepted": self.accepted,
                "refused_limit": self.refused_limit, "refused_scope": self.refused_scope}


class SessionRecord(NamedTuple):
    """A signed-in console session as the store keeps it: who, since when, last seen.

    ``id_hash`` is the SHA-256 of the session id the browser holds, so the store alone
    can't resume anybody's session. No key, no scopes: the key is looked up on every use.
    """

    id_hash: str
    key_id: str
    created_at: float
    last_seen_at: float
    csrf_secret: str
