"""What the store keeps about a key, and who a verified caller is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple


def isoformat(ts: float | None) -> str | None:
    """Epoch seconds → ISO 8601 UTC with a ``Z`` (``None`` stays ``None``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


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

    def metadata(self) -> dict[str, Any]:
        """The public view: everything but the hash, timestamps as ISO 8601."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": isoformat(self.created_at),
            "expires_at": isoformat(self.expires_at),
            "revoked_at": isoformat(self.revoked_at),
            "last_used_at": isoformat(self.last_used_at),
            "use_count": self.use_count,
            "rate_limit": self.rate_limit,
            "allowed_ips": list(self.allowed_ips),
            "replaces": self.replaces,
        }


def key_state(record: KeyRecord, now: float) -> str:
    """``revoked`` (from ``revoked_at`` on), ``expired``, ``grace`` (rotated, accepted until
    ``revoked_at``) or ``active``: the order in which verification refuses a key."""
    if record.revoked_at is not None and record.revoked_at <= now:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "grace" if record.revoked_at is not None else "active"


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": isoformat(self.at),
            "event": self.event,
            "key_id": self.key_id,
            "actor": self.actor,
            "detail": self.detail,
        }
