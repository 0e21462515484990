"""Schemathesis fuzzes the app against openapi.yaml: a property-based tester that nobody here
wrote, generating requests from the document (valid ones, and invalid ones on purpose) and
checking every answer against it.

Every operation is fuzzed four times, each time against a fresh app and store:

- ``admin``: with a real admin key in the ``API-Key`` header (the admin scope opens everything);
- ``token``: with a real query token (``data:read``) minted through ``POST /tokens``;
- ``wrong``: with a wrong credential: junk, a mistyped key, a well-formed unknown key, the admin
  key's id with another secret, and, where a token is accepted, forged or raw-key tokens;
- ``none``: with no credential at all;

and a stateful run as admin chains operations through the links Schemathesis infers (create a
key, read it, rotate it, revoke it, mint a token, ...), which the stateless runs can't reach:
there every generated key id is unknown.

Every response goes through Schemathesis's checks: no 5xx; status code, content type, body and
headers as documented; schema-invalid input refused (``negative_data_rejection``); schema-valid
input accepted (``positive_data_acceptance``); missing required headers and undocumented
methods refused; authentication enforced where it is declared (``ignored_auth``). And three of
ours: a problem's ``code`` is one its response documents (every error response is the one
``Problem`` schema, so its examples, one per code, say which); a secured operation never
succeeds without a valid credential; and a refusal says what was wrong with the credential
(``missing_credentials`` / ``invalid_credentials`` with the matching ``WWW-Authenticate``
challenge).

Judgement calls, made on purpose:

- ``positive_data_acceptance`` is on for every operation: the document states exactly what the
  server accepts (patterns the parsers are held to in tests/test_parse.py, the token TTL's
  maximum), so every schema-valid request is accepted, except where the state of a key refuses
  it (rotating one already revoked or rotated: ``409 conflict``, documented, and among the
  statuses the check allows) — and one rule no pattern can state: an ``allowed_ips`` item must
  be a valid CIDR block with its host bits zero (``format: cidr``; ``10.0.0.1/8`` and
  ``999.0.0.0/8`` fit the pattern's characters). Schemathesis generates real blocks for that
  format (below), but its coverage phase builds values from the pattern alone; so on
  ``POST /admin/keys`` and ``PATCH /admin/keys/{id}`` the check is replaced by one that lets a
  400 pass only when it names ``allowed_ips`` and an item of the request really is no CIDR block.
  Likewise ``GET /admin/keys/{id}/usage`` may refuse a range no schema can rule out (one that
  runs backwards, or spans more than 2,400 buckets, or a date-time JSON Schema takes and Python
  doesn't, such as a leap second): there a 400 passes only when it names ``from`` or ``to``.
- ``use_after_free`` is off: ``DELETE /admin/keys/{id}`` revokes, and the key's metadata stays
  readable (the audit trail needs it); the document says so, and that repeating it answers 204.

The run is derandomized, so a given tree of code fuzzes the same way every time (Hypothesis also
draws constants from the source it has loaded, so this file alone and the whole suite explore a
little differently; each is reproducible). KEYGATE_FUZZ_RANDOM=1 explores with fresh seeds and
KEYGATE_FUZZ_EXAMPLES=N changes the example count per operation (default 100).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import random
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from schemathesis.checks import positive_data_acceptance, use_after_free
from schemathesis.config import SchemathesisConfig

import keys
from conftest import strong_secret
from api import create_app
from api.scopes import SCOPES
from keys import keyformat
from keys.keyformat import generate_key
from keys.tokens import TokenSigner

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
# A fuzzer: over a minute of CPU, out of the `-m "not slow"` loop. One xdist worker runs the
# whole module (--dist loadgroup): its last test reads what the fuzzing runs before it saw.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("schemathesis")]
EXAMPLES = int(os.environ.get("KEYGATE_FUZZ_EXAMPLES", "100"))
DETERMINISTIC = os.environ.get("KEYGATE_FUZZ_RANDOM") != "1"
#: Hypothesis's function-scoped-fixture warning is moot: each test *item* gets a fresh app on
#: purpose, shared by that item's examples, like a real server's store.
FUZZ = settings(max_examples=EXAMPLES, derandomize=DETERMINISTIC, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow, HealthCheck.filter_too_much])



def _cidr_blocks() -> st.SearchStrategy[str]:
    """Valid CIDR blocks (``format: cidr``), IPv4 and IPv6, as a client would write them."""
    v4 = st.builds(lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False)),
                   st.integers(0, 2**32 - 1), st.integers(0, 32))
    v6 = st.builds(lambda a, p: str(ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{p}", strict=False)),
                   st.integers(0, 2**128 - 1), st.integers(0, 128))
    return st.one_of(v4, v6)


schemathesis.openapi.format("cidr", _cidr_blocks())


def _is_cidr(text: Any) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
    except (TypeError, ValueError):
        return False
    return True


#: ``GET /admin/keys/{id}/usage``'s refusals of schema-valid input (module docstring).
USAGE_RANGE_REFUSAL = re.compile(r"(from|to)\b|at most \d+ (hour|day)s")


class Target:
    """The WSGI app Schemathesis calls: the current test's own app, with its own store."""

    def __init__(self) -> None:
        self.app: Any = None
        self.admin = ""
        self.token = ""
        self.wrong: Iterator[tuple[str, str]] = iter(())
        self.mode = ""
        self.instance_path = Path()
        self.statuses: dict[str, Counter[tuple[str, int]]] = {}
        self.requests = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.requests += 1
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")

        def record(status: str, headers: Any, *exc: Any) -> Any:
            if method != "OPTIONS":  # every path answers it, without credentials
                self.statuses.setdefault(self.mode, Counter())[(path, int(status[:3]))] += 1
            return start_response(status, headers, *exc)

        return self.app(environ, record)


TARGET = Target()


def _load() -> Any:
    config = SchemathesisConfig.from_dict({
        "generation": {
            "max-examples": EXAMPLES,
            "deterministic": DETERMINISTIC,
            "database": "none",  # no example database (.hypothesis/ still caches constants; gitignored)
            # Credentials are ours to send (below), not random strings in the security parameters.
            "with-security-parameters": False,
        },
    })
    schema = schemathesis.openapi.from_path(SPEC_PATH, config=config)
    schema.app = TARGET
    return schema


as_admin, with_token, with_wrong_credentials, without_credentials, stateful = (_load() for _ in range(5))


def _security(case: Any) -> list[dict[str, list[str]]]:
    return case.operation.definition.raw.get("security") or []


def _documented_call(case: Any, response: Any) -> bool:
    """A secured operation called with its own method (the coverage phase also tries others:
    405, or OPTIONS, which every path answers without credentials)."""
    return bool(_security(case)) and response.request.method == case.operation.method.upper()


def _accepts(case: Any, scheme: str) -> bool:
    return any(scheme in requirement for requirement in _security(case))


def _wrong_credentials(store: keys.KeyStore) -> Iterator[tuple[str, str]]:
    """(where, value) forever: every kind of wrong credential, in turn."""
    admin = TARGET.admin
    forged = TokenSigner([secrets.token_urlsafe(36)], scopes=SCOPES).mint(store.get(admin[3:15]), ["data:read"]).token
    return itertools.cycle([
        ("header", "kg_not_a_real_key"),                                        # malformed
        ("header", admin[:-1] + ("x" if admin[-1] != "x" else "y")),            # mistyped
        ("header", generate_key().plaintext),                                   # well-formed, unknown
        ("header", generate_key(admin[3:15]).plaintext),                        # known id, wrong secret
        ("query", "garbage"),                                                   # not a token
        ("query", admin),                                                       # a raw key in the URL
        ("query", forged),                                                      # signed with another secret
    ])


def start_fresh_app(instance_path: Path) -> None:
    """A new app and store, with rate limits that fuzzing can't reach (its own key's, and the
    throttle of the wrong credentials it sends on purpose), an admin key and a token."""
    store = keys.MemoryKeyStore()
    app = create_app({"DATABASE_URL": "memory://", "SECRET_KEY": strong_secret(),
                      "INSTANCE_PATH": str(instance_path), "DEFAULT_RATE_LIMIT": "1000000/minute",
                      "AUTH_FAILURE_LIMIT": "1000000/minute"}, store=store)
    TARGET.app = app
    TARGET.admin = keys.issue_key(store, name="fuzz-admin", scopes=["admin"], actor="test").plaintext
    minted = app.test_client().post("/tokens", headers={"API-Key": TARGET.admin}, json={"scopes": ["data:read"]})
    assert minted.status_code == 201, minted.get_data(as_text=True)
    TARGET.token = minted.get_json()["token"]
    TARGET.wrong = _wrong_credentials(store)


@pytest.fixture(autouse=True)
def fresh_app(tmp_path: Path) -> Iterator[None]:
    """Every test item fuzzes its own app and store."""
    TARGET.instance_path = tmp_path / "instance"
    start_fresh_app(TARGET.instance_path)
    yield
    TARGET.app = None


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Prints how many requests the fuzzing sent, and how long it took."""
    started, before = time.monotonic(), TARGET.requests
    yield
    seconds = time.monotonic() - started
    lines = [f"schemathesis: {TARGET.requests - before} requests in {seconds:.1f} s "
             f"({EXAMPLES} examples per operation, {'deterministic' if DETERMINISTIC else 'random'})"]
    for mode, counts in TARGET.statuses.items():
        by_status = Counter()
        for (_, status), n in counts.items():
            by_status[status] += n
        lines.append(f"  {mode}: {sum(by_status.values())} requests, "
                     + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)


# -- our own checks -----------------------------------------------------------------


def schema_valid_input_is_accepted_unless_no_cidr_block(ctx: Any, response: Any, case: Any) -> None:
    """``positive_data_acceptance`` for ``POST /admin/keys`` and ``PATCH /admin/keys/{id}``
    (module docstring)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    problem = _problem(response)
    items = case.body.get("allowed_ips") if isinstance(case.body, dict) else None
    assert problem["code"] == "invalid_request" and problem["detail"].startswith("allowed_ips") \
        and any(not _is_cidr(item) for item in items or []), (
        f"schema-valid request refused for a reason the document doesn't give: {problem['detail']}")


def schema_valid_input_is_accepted_unless_no_range(ctx: Any, response: Any, case: Any) -> None:
    """``positive_data_acceptance`` for ``GET /admin/keys/{id}/usage`` (module docstring)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    problem = _problem(response)
    assert problem["code"] == "invalid_request" and USAGE_RANGE_REFUSAL.match(problem["detail"]), (
        f"schema-valid request refused for a reason the document doesn't give: {problem['detail']}")


def _problem(response: Any) -> dict[str, Any]:
    return json.loads(response.content)


def no_success_without_a_valid_credential(ctx: Any, response: Any, case: Any) -> None:
    if _documented_call(case, response):
        assert not 200 <= response.status_code < 300, (
            f"{case.operation.label} answered {response.status_code} to a request without a valid credential")


def refusal_names_the_credential_problem(ctx: Any, response: Any, case: Any) -> None:
    """A 401 says what was wrong: nothing sent, or what was sent is not accepted."""
    if response.status_code != 401:
        return
    code = _problem(response)["code"]
    challenge = response.headers.get("www-authenticate", [""])
    challenge = challenge[0] if isinstance(challenge, list) else challenge
    if TARGET.mode == "none":
        assert code == "missing_credentials", code
        assert challenge == 'ApiKey realm="keygate"', challenge
    else:
        assert code in {"invalid_credentials", "invalid_token"}, code
        assert challenge == 'ApiKey realm="keygate", error="invalid_token"', challenge


SPEC = yaml.safe_load(SPEC_PATH.read_text())


def _documented_codes(case: Any, status: int) -> set[str] | None:
    """The codes the operation's response for ``status`` documents (its examples, one per code);
    ``None`` when it documents no such status (Schemathesis's own status check judges that)."""
    response = case.operation.definition.raw.get("responses", {}).get(str(status))
    while response is not None and "$ref" in response:
        target: Any = SPEC
        for part in response["$ref"][2:].split("/"):
            target = target[part]
        response = target
    if response is None or "application/problem+json" not in response.get("content", {}):
        return None
    return set(response["content"]["application/problem+json"].get("examples", {}))


def problem_code_is_one_its_response_documents(ctx: Any, response: Any, case: Any) -> None:
    """Every error response is the one Problem schema, so the schema no longer says which codes a
    status carries: its examples do, and an answer outside them is undocumented."""
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/problem+json"):
        return
    if response.request.method != case.operation.method.upper():
        return  # another method (405) or OPTIONS, tried by the coverage phase
    codes = _documented_codes(case, response.status_code)
    if codes is not None:
        code = _problem(response)["code"]
        assert code in codes, f"{case.operation.label} answered {response.status_code} {code}; documented: {sorted(codes)}"


def _checks(case: Any, *extra: Callable[..., None]) -> dict[str, Any]:
    narrower = {"createKey": schema_valid_input_is_accepted_unless_no_cidr_block,
                "updateKey": schema_valid_input_is_accepted_unless_no_cidr_block,
                "getKeyUsage": schema_valid_input_is_accepted_unless_no_range,
                }.get(case.operation.definition.raw.get("operationId"))
    if narrower is not None:
        return {"excluded_checks": [use_after_free, positive_data_acceptance],
                "additional_checks": [narrower, problem_code_is_one_its_response_documents, *extra]}
    return {"excluded_checks": [use_after_free],
            "additional_checks": [problem_code_is_one_its_response_documents, *extra]}


# -- the runs -----------------------------------------------------------------------


@as_admin.parametrize()
@FUZZ
def test_as_admin(case: Any) -> None:
    TARGET.mode = "admin"
    headers = {"API-Key": TARGET.admin} if _security(case) else None
    case.call_and_validate(headers=headers, **_checks(case))


@with_token.parametrize()
@FUZZ
def test_with_a_query_token(case: Any) -> None:
    """/data answers the token; every other secured operation refuses it (403 insufficient_scope)."""
    TARGET.mode = "token"
    params = {"token": TARGET.token} if _security(case) else None
    response = case.call_and_validate(params=params, **_checks(case))
    if _documented_call(case, response) and not _accepts(case, "token") and response.status_code != 404:
        assert response.status_code == 403 and _problem(response)["code"] == "insufficient_scope"


@with_wrong_credentials.parametrize()
@FUZZ
def test_with_wrong_credentials(case: Any) -> None:
    TARGET.mode = "wrong"
    if not _security(case):
        case.call_and_validate(**_checks(case))
        return
    where, value = next(TARGET.wrong)
    if where == "query" and not _accepts(case, "token"):
        where, value = next(w for w in TARGET.wrong if w[0] == "header")
    kw = {"headers": {"API-Key": value}} if where == "header" else {"params": {"token": value}}
    case.call_and_validate(**kw, **_checks(case, no_success_without_a_valid_credential,
                                           refusal_names_the_credential_problem))


@without_credentials.parametrize()
@FUZZ
def test_without_credentials(case: Any) -> None:
    TARGET.mode = "none"
    case.call_and_validate(**_checks(case, no_success_without_a_valid_credential,
                                     refusal_names_the_credential_problem))


class AdminStateMachine(stateful.as_state_machine()):  # type: ignore[misc]
    """Chains operations through the links Schemathesis infers from the document."""

    def setup(self) -> None:
        # Each scenario starts from an empty store whose key ids come from a fixed seed: Hypothesis
        # replays scenarios and needs the app to answer a replay exactly as before.
        KEY_RANDOM.seed(0)
        start_fresh_app(TARGET.instance_path)

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        return {"headers": {"API-Key": TARGET.admin}} if _security(case) else {}

    def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
        checks = _checks(case)
        case.validate_response(
            response, headers=kwargs.get("headers"), transport_kwargs=kwargs or None, recorder=self.recorder,
            excluded_checks=checks["excluded_checks"],
            additional_checks=[*(additional_checks or []), *checks["additional_checks"]],
        )


KEY_RANDOM = random.Random(0)


def test_stateful_as_admin(monkeypatch: pytest.MonkeyPatch) -> None:
    TARGET.mode = "stateful"
    monkeypatch.setattr(keyformat, "_random", lambda n: "".join(KEY_RANDOM.choice(keyformat.ALPHABET) for _ in range(n)))
    AdminStateMachine.run(settings=settings(FUZZ, stateful_step_count=10))
    # The chains reached what the stateless runs can't: existing keys read, rotated, revoked.
    reached = {(re.sub(r"/admin/keys/[^/]+", "/admin/keys/{id}", path), status)
               for path, status in TARGET.statuses["stateful"]}
    assert {("/admin/keys/{id}", 200), ("/admin/keys/{id}/rotate", 201), ("/admin/keys/{id}", 204)} <= reached, reached


def test_the_fuzzing_reached_every_outcome() -> None:
    """Not vacuous: as admin every operation succeeded at least once, and nothing else did."""
    if not {"admin", "token", "wrong", "none"} <= set(TARGET.statuses):
        pytest.skip("runs only after the four fuzzing runs (run the whole module)")
    succeeded = {path for path, status in TARGET.statuses["admin"] if 200 <= status < 300}
    assert {"/secret", "/data", "/admin", "/tokens", "/admin/keys", "/admin/audit", "/healthz",
            "/openapi.json", "/docs"} <= succeeded, succeeded
    token_ok = {path for path, status in TARGET.statuses["token"] if 200 <= status < 300}
    assert "/data" in token_ok and not token_ok & {"/secret", "/admin", "/tokens", "/admin/keys"}, token_ok
    for mode in ("wrong", "none"):
        refused = Counter(status for _, status in TARGET.statuses[mode])
        assert refused[401] > 50, (mode, refused)  # dozens at least: the runs were not vacuous


def test_what_the_fuzzer_found_stays_fixed() -> None:
    """Each was a failing Schemathesis example once; here they run whatever the seed."""
    spec = yaml.safe_load(SPEC_PATH.read_text())
    registry = Registry().with_resource("urn:spec", Resource.from_contents(spec, default_specification=DRAFT4))
    create_key = OAS30Validator({"$ref": "urn:spec#/components/schemas/CreateKey"}, registry=registry)
    client = TARGET.app.test_client()

    def create(**fields: Any) -> Any:
        body = {"name": "n", "scopes": ["data:read"], **fields}
        return body, client.post("/admin/keys", headers={"API-Key": TARGET.admin}, json=body)

    # allowed_ips {} (or "", 0, false) was taken for "anywhere" (`or []`): the document says an array or null.
    for junk in ({}, "", 0, False):
        body, resp = create(allowed_ips=junk)
        assert not create_key.is_valid(body)
        assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_request", junk
    # Up to 100 years in seconds is accepted, as the document's prose said; its maximum said 999999999.
    body, resp = create(expires_in=100 * 365 * 86400)
    assert create_key.is_valid(body) and resp.status_code == 201
    # Whitespace around a duration or a rate limit is ignored; the document's patterns said it was invalid.
    body, resp = create(expires_in="\t90d ", rate_limit=" 3 / minute\n")
    assert create_key.is_valid(body) and resp.status_code == 201
    # A body of a vertical tab (which bytes.strip() removes, JSON doesn't) was taken for "no body".
    for junk in (b"\x0b", b"\x0c", b" "):
        resp = client.post("/tokens", headers={"API-Key": TARGET.admin, "Content-Type": "application/json"}, data=junk)
        assert resp.status_code == 400 and resp.get_json()["code"] == "invalid_request", junk
    assert client.post("/tokens", headers={"API-Key": TARGET.admin}).status_code == 201  # no body at all
