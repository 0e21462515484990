"""The API key format: prefix, length, alphabet, entropy, checksum and hashing.

No store is needed here: the checksum must refuse a mistyped or random string
before verification ever asks a store, which a store double proves.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import string

import pytest

from keys import InvalidCredentials, generate_key, hash_key, issue_key, looks_like_key, parse_key, verify_key
from keys.keyformat import ALPHABET, CHECKSUM_LENGTH, ID_LENGTH, KEY_LENGTH, PREFIX, SECRET_LENGTH, is_key_id
from keys.store import MemoryKeyStore

BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_RE = re.compile(r"kg_[0-9A-Za-z]+")


class NoStoreAccess:
    """A store double that fails the test if verification looks anything up."""

    backend = "double"

    def __init__(self) -> None:
        self.calls = 0

    def get(self, key_id: str):  # noqa: ANN201
        self.calls += 1
        raise AssertionError(f"the store was asked for {key_id!r}; the checksum should have refused it")


def mutations(key: str):  # noqa: ANN201
    """Every string that differs from ``key`` in exactly one character (any printable ASCII)."""
    for i, original in enumerate(key):
        for c in string.printable:
            if c != original:
                yield key[:i] + c + key[i + 1 :]


# -- format -----------------------------------------------------------------------


def test_key_shape():
    plaintext = generate_key().plaintext
    assert plaintext.startswith("kg_")
    assert PREFIX == "kg_"
    assert len(plaintext) == KEY_LENGTH == len(PREFIX) + ID_LENGTH + SECRET_LENGTH + CHECKSUM_LENGTH
    assert KEY_RE.fullmatch(plaintext), plaintext
    assert set(plaintext[len(PREFIX):]) <= set(BASE62)
    assert sorted(ALPHABET) == sorted(BASE62) and len(set(ALPHABET)) == 62


def test_secret_part_carries_at_least_128_bits():
    assert SECRET_LENGTH * math.log2(62) >= 128


def test_generated_key_parses_to_its_own_id():
    key = generate_key()
    parsed = parse_key(key.plaintext)
    assert parsed.key_id == key.key_id
    assert parsed.plaintext == key.plaintext
    assert key.plaintext[len(PREFIX) : len(PREFIX) + ID_LENGTH] == key.key_id
    assert is_key_id(key.key_id)
    assert looks_like_key(key.plaintext)


def test_generate_key_for_a_given_id_keeps_that_id():
    key_id = generate_key().key_id
    again = generate_key(key_id)
    assert again.key_id == key_id
    assert parse_key(again.plaintext).key_id == key_id


def test_keys_are_unique_and_their_characters_look_random():
    keys = [generate_key() for _ in range(5000)]
    assert len({k.plaintext for k in keys}) == len(keys)
    assert len({k.key_id for k in keys}) == len(keys)
    secrets_ = [k.plaintext[len(PREFIX) + ID_LENGTH : -CHECKSUM_LENGTH] for k in keys]
    assert len(set(secrets_)) == len(keys)
    # Every base62 character turns up in the secret parts (160 000 draws from 62 symbols).
    assert set("".join(secrets_)) == set(BASE62)


# -- checksum ---------------------------------------------------------------------


def test_every_single_character_mutation_is_refused_without_store_access():
    plaintext = generate_key().plaintext
    double = NoStoreAccess()
    count = 0
    for mutated in mutations(plaintext):
        count += 1
        assert not looks_like_key(mutated), mutated
        with pytest.raises(InvalidCredentials):
            verify_key(double, mutated)
    assert count == len(plaintext) * (len(string.printable) - 1)
    assert double.calls == 0


@pytest.mark.parametrize("seed", range(3))
def test_every_base62_substitution_is_refused(seed):
    """Within the alphabet the regex can't help: only the checksum catches these."""
    plaintext = generate_key().plaintext
    double = NoStoreAccess()
    rng = random.Random(seed)
    positions = range(len(PREFIX), len(plaintext))
    for i in positions:
        for c in rng.sample(BASE62, 62):
            if c == plaintext[i]:
                continue
            mutated = plaintext[:i] + c + plaintext[i + 1 :]
            with pytest.raises(InvalidCredentials):
                verify_key(double, mutated)
    assert double.calls == 0


def test_transpositions_truncations_and_extensions_are_refused():
    plaintext = generate_key().plaintext
    double = NoStoreAccess()
    candidates = {plaintext[:-1], plaintext + "0", "0" + plaintext, plaintext[1:], plaintext.upper(),
                  plaintext.lower(), plaintext[:-CHECKSUM_LENGTH]}
    for i in range(len(PREFIX), len(plaintext) - 1):
        if plaintext[i] != plaintext[i + 1]:
            candidates.add(plaintext[:i] + plaintext[i + 1] + plaintext[i] + plaintext[i + 2 :])
    candidates.discard(plaintext)
    for candidate in candidates:
        with pytest.raises(InvalidCredentials):
            verify_key(double, candidate)
    assert double.calls == 0


def test_random_well_formed_strings_are_refused_without_store_access():
    rng = random.Random(1234)
    double = NoStoreAccess()
    for _ in range(20000):
        candidate = PREFIX + "".join(rng.choice(BASE62) for _ in range(KEY_LENGTH - len(PREFIX)))
        with pytest.raises(InvalidCredentials):
            verify_key(double, candidate)
    assert double.calls == 0


@pytest.mark.parametrize("value", [
    "", " ", "kg_", "kg", "KG_", "x" * KEY_LENGTH, "\x00" * KEY_LENGTH, "é" * KEY_LENGTH,
    "' OR 1=1 --", "kg_'; DROP TABLE api_keys; --", "Bearer kg_abc", "kg_" + "1" * 8192,
    "kg_" + "١" * (KEY_LENGTH - 3),  # Arabic-Indic digits: not base62
])
def test_malformed_values_are_refused_without_store_access(value):
    double = NoStoreAccess()
    with pytest.raises(InvalidCredentials):
        verify_key(double, value)
    assert not looks_like_key(value)
    assert double.calls == 0


def test_a_valid_checksum_does_reach_the_store():
    """The other half of the proof: the double does notice a lookup."""
    double = NoStoreAccess()
    with pytest.raises(AssertionError):
        verify_key(double, generate_key().plaintext)
    assert double.calls == 1


def test_malformed_errors_look_exactly_like_unknown_keys():
    store = MemoryKeyStore()
    with pytest.raises(InvalidCredentials) as bad:
        verify_key(store, "kg_nope")
    with pytest.raises(InvalidCredentials) as unknown:
        verify_key(store, generate_key().plaintext)
    assert type(bad.value) is type(unknown.value)
    assert bad.value.detail == unknown.value.detail


# -- hashing ----------------------------------------------------------------------


def test_hash_is_sha256_hex_of_the_plaintext():
    plaintext = generate_key().plaintext
    digest = hash_key(plaintext)
    assert digest == hashlib.sha256(plaintext.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != plaintext
    assert hash_key(plaintext) == digest  # deterministic


def test_stored_record_holds_the_hash_never_the_plaintext_or_secret():
    store = MemoryKeyStore()
    issued = issue_key(store, name="hashing", scopes=["secret:read"])
    record = store.get(issued.record.id)
    secret_part = issued.plaintext[len(PREFIX) + ID_LENGTH : -CHECKSUM_LENGTH]
    assert record.key_hash == hash_key(issued.plaintext)
    assert record.key_hash != issued.plaintext
    for value in (record.key_hash, repr(record), str(record.metadata())):
        assert issued.plaintext not in value
        assert secret_part not in value
    assert "key_hash" not in record.metadata()


def test_hashes_are_unique_over_many_keys():
    hashes = {hash_key(generate_key().plaintext) for _ in range(5000)}
    assert len(hashes) == 5000
