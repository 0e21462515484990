"""Every outcome of verifying a presented key, in the order an attacker could probe them.

Unknown ids and wrong secrets give one answer; only the holder of the real secret
learns that a key is revoked or expired; IP allow-lists and the scope rule come after.
"""

from __future__ import annotations

import pytest

from api.scopes import ADMIN, ALL_SCOPES, SCOPES
from keys import (
    InvalidCredentials,
    IpNotAllowed,
    KeyExpired,
    KeyRevoked,
    find_by_plaintext,
    generate_key,
    issue_key,
    match_key,
    verify_key,
)
from keys.exc import AuthenticationError, NotFound
from keys.keyformat import CHECKSUM_LENGTH, ID_LENGTH, PREFIX
from keys.verify import check_ip, ip_allowed

NOW = 1_800_000_000.0
grants = SCOPES.grants  # the service's rule: admin opens everything


def issue(store, **kw):  # noqa: ANN001, ANN003, ANN201
    kw.setdefault("name", "verify")
    kw.setdefault("scopes", ["secret:read"])
    kw.setdefault("now", NOW - 3600)
    return issue_key(store, **kw)


def wrong_secret_for(key_id: str) -> str:
    """A well-formed key (valid checksum) for a known id, with another secret."""
    return generate_key(key_id).plaintext


def refusal(store, presented: str, now: float = NOW) -> AuthenticationError:  # noqa: ANN001
    with pytest.raises(AuthenticationError) as info:
        verify_key(store, presented, now=now)
    assert info.value.status == 401
    return info.value


# -- identity -----------------------------------------------------------------------


def test_valid_key(store):
    issued = issue(store)
    assert verify_key(store, issued.plaintext, now=NOW) == issued.record
    assert match_key(store, issued.plaintext) == issued.record


def test_unknown_id_with_valid_checksum(store):
    issue(store)
    err = refusal(store, generate_key().plaintext)
    assert type(err) is InvalidCredentials and err.code == "invalid_credentials"


def test_wrong_secret_for_a_known_id_is_indistinguishable_from_an_unknown_id(store):
    issued = issue(store)
    wrong = wrong_secret_for(issued.record.id)
    assert wrong != issued.plaintext
    assert wrong[: len(PREFIX) + ID_LENGTH] == issued.plaintext[: len(PREFIX) + ID_LENGTH]
    known = refusal(store, wrong)
    unknown = refusal(store, generate_key().plaintext)
    malformed = refusal(store, issued.plaintext[:-1])
    for err in (known, unknown, malformed):
        assert type(err) is InvalidCredentials
        assert (err.code, err.detail, err.headers()) == (unknown.code, unknown.detail, unknown.headers())
        assert issued.record.id not in err.detail


def test_same_secret_with_another_checksum_is_refused(store):
    issued = issue(store)
    body = issued.plaintext[:-CHECKSUM_LENGTH]
    assert type(refusal(store, body + "000000")) is InvalidCredentials


# -- lifecycle ----------------------------------------------------------------------


def test_revoked_key_with_the_right_secret(store):
    issued = issue(store)
    store.revoke(issued.record.id, NOW - 1)
    err = refusal(store, issued.plaintext)
    assert type(err) is KeyRevoked and err.code == "key_revoked"


def test_revoked_key_with_a_wrong_secret_is_just_invalid(store):
    issued = issue(store)
    store.revoke(issued.record.id, NOW - 1)
    err = refusal(store, wrong_secret_for(issued.record.id))
    assert type(err) is InvalidCredentials
    assert err.detail == refusal(store, generate_key().plaintext).detail


def test_revocation_takes_effect_at_its_time(store):
    issued = issue(store)
    store.revoke(issued.record.id, NOW)
    assert verify_key(store, issued.plaintext, now=NOW - 0.001) is not None
    assert type(refusal(store, issued.plaintext, now=NOW)) is KeyRevoked


def test_future_revocation_is_a_grace_period(store):
    issued = issue(store)
    store.revoke(issued.record.id, NOW + 3600)
    assert verify_key(store, issued.plaintext, now=NOW).id == issued.record.id
    assert verify_key(store, issued.plaintext, now=NOW + 3599).id == issued.record.id
    assert type(refusal(store, issued.plaintext, now=NOW + 3600)) is KeyRevoked


def test_expired_key_with_the_right_secret(store):
    issued = issue(store, expires_in=60, now=NOW - 120)
    err = refusal(store, issued.plaintext)
    assert type(err) is KeyExpired and err.code == "key_expired"


def test_expired_key_with_a_wrong_secret_is_just_invalid(store):
    issued = issue(store, expires_in=60, now=NOW - 120)
    assert type(refusal(store, wrong_secret_for(issued.record.id))) is InvalidCredentials


def test_expiry_takes_effect_at_its_time(store):
    issued = issue(store, expires_in=3600, now=NOW)
    assert verify_key(store, issued.plaintext, now=NOW + 3599.999).id == issued.record.id
    assert type(refusal(store, issued.plaintext, now=NOW + 3600)) is KeyExpired


def test_a_key_both_revoked_and_expired_reports_revoked(store):
    issued = issue(store, expires_in=60, now=NOW - 120)
    store.revoke(issued.record.id, NOW - 30)
    assert type(refusal(store, issued.plaintext)) is KeyRevoked


def test_a_dead_key_is_still_found_by_its_plaintext(store):
    """``revoke-key --key`` must find a leaked key whatever its state."""
    issued = issue(store, expires_in=60, now=NOW - 120)
    store.revoke(issued.record.id, NOW - 30)
    assert match_key(store, issued.plaintext).id == issued.record.id
    assert find_by_plaintext(store, issued.plaintext).id == issued.record.id
    with pytest.raises(NotFound):
        find_by_plaintext(store, wrong_secret_for(issued.record.id))


# -- IP allow-lists -----------------------------------------------------------------


@pytest.mark.parametrize(("allowed", "address", "ok"), [
    ((), "203.0.113.9", True),
    ((), None, True),
    ((), "garbage", True),
    (("10.0.0.0/8",), "10.0.0.1", True),
    (("10.0.0.0/8",), "10.255.255.255", True),
    (("10.0.0.0/8",), "11.0.0.1", False),
    (("10.0.0.0/8",), "9.255.255.255", False),
    (("192.168.1.7/32",), "192.168.1.7", True),
    (("192.168.1.7/32",), "192.168.1.8", False),
    (("10.0.0.0/8", "192.168.0.0/16"), "192.168.3.4", True),
    (("2001:db8::/32",), "2001:db8::1", True),
    (("2001:db8::/32",), "2001:DB8:0:0::abcd", True),
    (("2001:db8::/32",), "2001:db9::1", False),
    (("::1/128",), "::1", True),
    (("::1/128",), "127.0.0.1", False),
    (("fe80::/10",), "fe80::1%eth0", True),  # a zone id is not part of the address
    # A dual-stack socket reports an IPv4 caller as IPv4-mapped IPv6.
    (("10.0.0.0/8",), "::ffff:10.0.0.1", True),
    (("10.0.0.0/8",), "::ffff:11.0.0.1", False),
    (("10.0.0.1/32",), "::ffff:10.0.0.1", True),
    # ...and an allow-list may be written that way too.
    (("::ffff:10.0.0.0/104",), "::ffff:10.0.0.1", True),
    (("::ffff:10.0.0.0/104",), "10.0.0.1", True),
    (("::ffff:10.0.0.0/104",), "11.0.0.1", False),
    (("2001:db8::/32",), "10.0.0.1", False),
    (("10.0.0.0/8",), "2001:db8::1", False),
    # Garbage is refused whenever there is a list to satisfy.
    (("0.0.0.0/0",), None, False),
    (("0.0.0.0/0",), "", False),
    (("0.0.0.0/0",), "garbage", False),
    (("0.0.0.0/0",), "10.0.0.256", False),
    (("0.0.0.0/0",), "10.0.0.1, 10.0.0.2", False),
    (("0.0.0.0/0",), " 10.0.0.1", False),
    (("0.0.0.0/0",), "10.0.0.1\x00", False),
    (("0.0.0.0/0", "::/0"), "unix:/run/keygate.sock", False),
])
def test_ip_allow_lists(allowed, address, ok):
    assert ip_allowed(allowed, address) is ok


def test_check_ip_refuses_with_ip_not_allowed(store):
    issued = issue(store, allowed_ips=["10.0.0.0/8", "2001:db8::/32"])
    record = verify_key(store, issued.plaintext, now=NOW)
    check_ip(record, "10.1.2.3")
    check_ip(record, "2001:db8::42")
    check_ip(record, "::ffff:10.1.2.3")
    for address in ("192.0.2.1", "2001:db9::1", "::ffff:192.0.2.1", "garbage", None):
        with pytest.raises(IpNotAllowed) as info:
            check_ip(record, address)
        assert info.value.status == 403 and info.value.code == "ip_not_allowed"


def test_a_key_without_an_allow_list_works_from_anywhere(store):
    issued = issue(store)
    record = verify_key(store, issued.plaintext, now=NOW)
    for address in ("192.0.2.1", "2001:db8::1", "::ffff:10.0.0.1", None):
        check_ip(record, address)


# -- scopes -------------------------------------------------------------------------


@pytest.mark.parametrize("required", [*ALL_SCOPES, "a:scope-added-later"])
def test_admin_opens_everything(required):
    assert grants((ADMIN,), required)


@pytest.mark.parametrize("held", [s for s in ALL_SCOPES if s != ADMIN])
def test_other_scopes_open_only_themselves(held):
    for required in ALL_SCOPES:
        assert grants((held,), required) is (required == held)


def test_verified_record_carries_the_scopes_for_the_rule(store):
    issued = issue(store, scopes=["data:read", "secret:read"])
    record = verify_key(store, issued.plaintext, now=NOW)
    assert grants(record.scopes, "secret:read") and grants(record.scopes, "data:read")
    assert not grants(record.scopes, "admin")


# -- issue 12: unknown ids cost the store what a wrong secret costs -----------------------------


SQL_ONLY = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)


@SQL_ONLY
def test_a_repeated_unknown_id_reaches_the_store_once_per_revision_check(store, make_app, monkeypatch):
    """Forged, checksum-valid keys with one unknown id: 500 requests were 500+ store round trips,
    against a handful for a real id with a wrong secret. Now both cost the same: a lookup
    when first seen, then none until the next revision check (0.5 s)."""
    app = make_app(store, AUTH_FAILURE_LIMIT="10000/minute")  # 1,000 bad keys on purpose
    client = app.test_client()
    real = issue(store)
    calls = {"get": 0, "revision": 0}
    for name in calls:
        original = getattr(store, name)

        def counting(*args, _name=name, _original=original):  # noqa: ANN002, ANN202
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(store, name, counting)
    unknown = generate_key().plaintext
    wrong = wrong_secret_for(real.record.id)

    def round_trips(presented: str) -> int:
        app.extensions["keygate"].lookup.clear()
        before = dict(calls)
        for _ in range(500):
            assert client.get("/secret", headers={"API-Key": presented}).status_code == 401
        return (calls["get"] - before["get"]) + (calls["revision"] - before["revision"])

    spent_unknown, spent_wrong = round_trips(unknown), round_trips(wrong)
    # One lookup, plus one per revision check (and the lookup it clears) during the run.
    assert spent_unknown <= 2 * spent_wrong + 1, (spent_unknown, spent_wrong)
    assert spent_unknown < 40, spent_unknown


def test_unknown_ids_are_remembered_until_the_next_revision_check_and_bounded():
    from keys.cache import CachedLookup
    from keys.store import MemoryKeyStore

    store = MemoryKeyStore()
    lookup = CachedLookup(store, max_staleness=3600, max_unknown=3)
    gets = []
    original = store.get
    store.get = lambda key_id: gets.append(key_id) or original(key_id)  # type: ignore[method-assign]
    ids = [generate_key().key_id for _ in range(5)]
    for _ in range(3):
        assert lookup.get(ids[0]) is None
    assert gets == [ids[0]]
    for key_id in ids:  # more unknown ids than it keeps: the oldest are forgotten
        lookup.get(key_id)
    assert len(lookup._unknown) == 3  # noqa: SLF001
    # A key created meanwhile (no revision change) works from the next check on.
    created = issue_key(store, name="late", scopes=["admin"]).record
    assert lookup.get(created.id) == created  # never presented before: looked up at once
    lookup.get(ids[4])
    lookup._checked = -float("inf")  # noqa: SLF001 — the staleness bound has passed
    gets.clear()
    lookup.get(ids[4])
    assert gets == [ids[4]]
