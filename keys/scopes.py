"""Scopes: the app's vocabulary of what a key may open, and the one rule that relates them.

The library knows no scope names of its own. An app names its scopes (and, if it
wants one, the scope that implies all others) in a ``Scopes``; without a
vocabulary any well-formed scope is accepted and each opens only itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .exc import InvalidRequest

# RFC 6749 §3.3 scope-token: printable ASCII without space, '"' or '\'. Stored
# space-separated, so a scope can never contain the separator.
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,100}")
#: More scopes than this on one key is a mistake, not a policy.
MAX_SCOPES = 100


def is_scope(value: object) -> bool:
    """Whether ``value`` is a well-formed scope name (RFC 6749's scope-token, at most 100 characters)."""
    return isinstance(value, str) and _SCOPE_RE.fullmatch(value) is not None


class Scopes:
    """A scope vocabulary: which names exist, and which one (if any) implies all others.

    ``Scopes(["reports:read", "reports:write"])`` accepts only those two names;
    ``Scopes()`` accepts any well-formed name. ``superscope="admin"`` makes a key
    holding ``admin`` open everything.
    """

    def __init__(self, names: Iterable[str] = (), *, superscope: str | None = None) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        for name in self.names:
            if not is_scope(name):
                raise ValueError(f"not a valid scope name: {name!r}")
        if superscope is not None and not is_scope(superscope):
            raise ValueError(f"not a valid scope name: {superscope!r}")
        if superscope is not None and self.names and superscope not in self.names:
            raise ValueError(f"the superscope {superscope!r} is not one of the scopes {self.names}")
        self.superscope = superscope
        self._known = frozenset(self.names)

    @classmethod
    def coerce(cls, value: Scopes | Iterable[str] | str | None, superscope: str | None = None) -> Scopes:
        """A ``Scopes`` from what an app may configure: a ``Scopes``, names, or one string
        of names separated by spaces or commas (``None``: any name, no superscope)."""
        if isinstance(value, Scopes):
            if superscope is not None and superscope != value.superscope:
                return cls(value.names, superscope=superscope)
            return value
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        elif value is not None and not isinstance(value, Iterable):
            raise ValueError(f"scopes must be names, not {type(value).__name__}")
        return cls(value or (), superscope=superscope)

    @property
    def closed(self) -> bool:
        """True when only the named scopes exist."""
        return bool(self.names)

    def __contains__(self, scope: object) -> bool:
        return scope in self._known if self.names else is_scope(scope)

    def __repr__(self) -> str:
        return f"Scopes({list(self.names)!r}, superscope={self.superscope!r})"

    def grants(self, held: Iterable[str], required: str) -> bool:
        """Whether scopes ``held`` open something that needs ``required``: held literally,
        or the superscope is held."""
        if required in held:
            return True
        return self.superscope is not None and self.superscope in held

    def parse(self, values: Iterable[object], field: str = "scopes") -> tuple[str, ...]:
        """Validate and de-duplicate scopes: in the vocabulary's order when it names its
        scopes, else in the order given. ``InvalidRequest`` names ``field``."""
        if isinstance(values, (str, bytes)):  # "a:b" would otherwise be the scopes a, :, b
            raise InvalidRequest(f"{field} must be a list of scope names, not one string", field=field)
        seen: dict[str, None] = {}
        for value in values:
            if value not in self:
                shown = value[:64] if isinstance(value, str) else type(value).__name__
                known = f"; known scopes: {', '.join(self.names)}" if self.names else \
                    " (a scope is 1-100 printable characters without spaces, quotes or backslashes)"
                raise InvalidRequest(f"unknown scope {shown!r}{known}", field=field)
            assert isinstance(value, str)
            seen[value] = None
            if len(seen) > MAX_SCOPES:
                raise InvalidRequest(f"{field}: at most {MAX_SCOPES} scopes", field=field)
        if not seen:
            raise InvalidRequest(f"{field}: at least one scope is required", field=field)
        if self.names:
            return tuple(s for s in self.names if s in seen)
        return tuple(seen)


#: Any well-formed scope, none implying another: what the library assumes when the app names none.
ANY_SCOPE = Scopes()
