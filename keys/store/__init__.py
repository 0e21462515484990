"""Pluggable key stores, chosen by URL."""

from __future__ import annotations

from ..exc import ConfigError
from .base import SCHEMA_VERSION, KeyStore
from .memory import MemoryKeyStore


def open_store(url: str) -> KeyStore:
    """``memory://`` → ``MemoryKeyStore``; ``sqlite:///…`` or ``postgresql://…`` → ``SqlKeyStore``."""
    if url == "memory://":
        return MemoryKeyStore()
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise ConfigError(
            f"unsupported database {scheme[:20]!r}; use sqlite:///path, postgresql://host/db or memory://"
        )
    if scheme == "postgres":  # Heroku-style alias
        url = "postgresql" + url[len("postgres"):]
    from .sql import SqlKeyStore  # SQLAlchemy is only imported when needed

    return SqlKeyStore(url)


__all__ = ["SCHEMA_VERSION", "KeyStore", "MemoryKeyStore", "open_store"]
