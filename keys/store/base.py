"""The key store interface: small on purpose, so a backend is an afternoon's work."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..model import KeyRecord

#: Schema version this code reads and writes; ``migrate()`` brings a store to it.
SCHEMA_VERSION = 1


class KeyStore(ABC):
    """Where keys live. Every method is safe to call from several threads.

    ``get`` is on the hot path of every request and must cost microseconds;
    the rest runs when keys are managed.
    """

    #: Short name of the backend, for logs and the CLI ("memory", "sqlite", ...).
    backend: str = "abstract"

    @abstractmethod
    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent. Returns the version reached."""

    @abstractmethod
    def schema_version(self) -> int:
        """The version the store is at now (0 when it was never initialised)."""

    @abstractmethod
    def add(self, record: KeyRecord) -> None:
        """Store a new key. The write is durable when this returns."""

    @abstractmethod
    def get(self, key_id: str) -> KeyRecord | None:
        """The key with this id, or ``None``."""

    @abstractmethod
    def list(self, *, limit: int | None = None, after: str | None = None) -> list[KeyRecord]:
        """Keys ordered by id; ``after`` is the last id of the previous page."""

    @abstractmethod
    def revoke(self, key_id: str, at: float) -> KeyRecord | None:
        """Revoke at ``at`` (kept if already revoked earlier); ``None`` if unknown."""

    @abstractmethod
    def count(self) -> int:
        """How many keys are stored, revoked ones included."""

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
