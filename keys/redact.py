"""Scrubbing credentials out of text that is about to be logged."""

from __future__ import annotations

import re

# Query parameters that carry credentials, and anything shaped like a key.
_QUERY_SECRET_RE = re.compile(r"(?i)([?&;](?:token|api[-_]?key|key)=)[^&#\s\"]*")
_KEY_RE = re.compile(r"kg_[0-9A-Za-z]{20,}")
# A query token outside a ``token=`` argument (say, pasted into a Referer): key id,
# generation, expiry, scopes, signature (see ``keys.tokens``). Anchored on a 12-character
# id that starts a word, so a long run of letters costs linear time, not quadratic.
_TOKEN_RE = re.compile(r"(?<![0-9A-Za-z])[0-9A-Za-z]{12}\.\d+\.\d+\.[\w-]+\.[\w-]{43}")
REDACTED = "[REDACTED]"


def redact(text: str) -> str:
    """``/data?token=abc&x=1`` → ``/data?token=[REDACTED]&x=1``; bare keys likewise."""
    if not text:
        return text
    text = _QUERY_SECRET_RE.sub(r"\1" + REDACTED, text)
    return _TOKEN_RE.sub(REDACTED, _KEY_RE.sub(REDACTED, text))


def redact_query(query: str) -> str:
    """Like ``redact`` for a bare query string (no leading ``?``)."""
    return redact("?" + query)[1:] if query else query
