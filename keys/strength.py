"""Whether a signing secret is strong enough to sign query tokens with.

Length alone lets ``"a" * 36`` or ``"changeme-changeme-changeme-changeme"`` through. A
secret is refused when it is short, uses few distinct characters, repeats itself (zlib
finds the repetition), or contains a word people put in placeholders. What
``GENERATE_SECRET`` prints always passes: hexadecimal can't spell any of those words.
"""

from __future__ import annotations

import zlib

MIN_LENGTH = 32
MIN_DISTINCT = 12
#: Compressed to less than this share of its length, a secret is mostly repetition.
MIN_COMPRESSED_RATIO = 0.6
PLACEHOLDER_WORDS = ("changeme", "secret", "password", "example", "test", "default")
GENERATE_SECRET = "python -c 'import secrets; print(secrets.token_hex(32))'"


def weakness(secret: str) -> str | None:
    """Why ``secret`` is too weak, or ``None`` when it is fine."""
    if len(secret) < MIN_LENGTH:
        return f"shorter than {MIN_LENGTH} characters"
    if len(set(secret)) < MIN_DISTINCT:
        return f"fewer than {MIN_DISTINCT} distinct characters"
    raw = secret.encode()
    if len(zlib.compress(raw, 9)) < MIN_COMPRESSED_RATIO * len(raw):
        return "repetitive (it compresses well)"
    lowered = secret.lower()
    for word in PLACEHOLDER_WORDS:
        if word in lowered:
            return f"contains the placeholder word {word!r}"
    return None
