"""Scrubbing credentials out of text that is about to be logged."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

# Query parameter names that carry credentials (compared after percent-decoding, so
# ``?%74oken=`` is ``?token=``), and any ``name=value`` pair in free text.
_SECRET_NAME_RE = re.compile(r"(?i)token|api[-_]?key|key")
_PAIR_RE = re.compile(r"([?&;])([^=&;#\s\"?]{1,64})=([^&;#\s\"]*)")
_KEY_RE = re.compile(r"kg_[0-9A-Za-z]{20,}")
# A query token outside a ``token=`` argument (say, pasted into a Referer): key id,
# generation, expiry, scopes, signature (see ``keys.tokens``). Anchored on a 12-character
# id that starts a word, so a long run of letters costs linear time, not quadratic.
_TOKEN_RE = re.compile(r"(?<![0-9A-Za-z])[0-9A-Za-z]{12}\.\d+\.\d+\.[\w-]+\.[\w-]{43}")
REDACTED = "[REDACTED]"


def _secret_value(name: str, value: str) -> bool:
    """Whether a ``name=value`` pair carries a credential: by its name, or by the shape of
    its value once percent-decoded (``%6Bg_…`` is ``kg_…``)."""
    if _SECRET_NAME_RE.fullmatch(unquote_plus(name)):
        return True
    if "%" in value or "+" in value:
        value = unquote_plus(value)
    return _KEY_RE.search(value) is not None or _TOKEN_RE.search(value) is not None


def _redact_pair(m: re.Match[str]) -> str:
    sep, name, value = m.groups()
    return f"{sep}{name}={REDACTED}" if value and _secret_value(name, value) else m.group()


def redact(text: str) -> str:
    """``/files?token=abc&x=1`` → ``/files?token=[REDACTED]&x=1``; bare keys and tokens likewise."""
    # Each pattern runs only where what it needs is there: most log values (a path, a
    # User-Agent) hold no "=", no "kg_" and not the four dots of a token.
    if "=" in text:
        text = _PAIR_RE.sub(_redact_pair, text)
    if "kg_" in text:
        text = _KEY_RE.sub(REDACTED, text)
    if text.count(".") >= 4:
        text = _TOKEN_RE.sub(REDACTED, text)
    return text


def redact_query(query: str) -> str:
    """Like ``redact`` for a bare query string (no leading ``?``)."""
    return redact("?" + query)[1:] if query else query
