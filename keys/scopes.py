"""The scopes a key can hold, and the one rule that relates them."""

from __future__ import annotations

from collections.abc import Iterable

from .exc import InvalidRequest

SECRET_READ = "secret:read"
DATA_READ = "data:read"
METRICS_READ = "metrics:read"
ADMIN = "admin"

#: Every scope keygate knows, in display order.
ALL_SCOPES: tuple[str, ...] = (SECRET_READ, DATA_READ, METRICS_READ, ADMIN)


def grants(held: Iterable[str], required: str) -> bool:
    """Whether scopes ``held`` open something that needs ``required``.

    ``admin`` opens everything; otherwise the scope must be held literally.
    """
    return required in held or ADMIN in held


def parse_scopes(values: Iterable[str], field: str = "scopes") -> tuple[str, ...]:
    """Validate and de-duplicate scopes, keeping the canonical order."""
    seen: set[str] = set()
    for value in values:
        if not isinstance(value, str) or value not in ALL_SCOPES:
            shown = value if isinstance(value, str) else type(value).__name__
            raise InvalidRequest(
                f"unknown scope {shown[:64]!r}; known scopes: {', '.join(ALL_SCOPES)}",
                field=field,
            )
        seen.add(value)
    if not seen:
        raise InvalidRequest(f"{field}: at least one scope is required", field=field)
    return tuple(s for s in ALL_SCOPES if s in seen)
