"""openapi.yaml is the contract: valid OpenAPI 3.0.3, in step with the routes the app serves,
naming every error code the code can emit, served at /openapi.json and shown by the Swagger UI
at /docs, and describing what the real app answers (statuses, content types, bodies, headers) for one request of every kind.

Every error response is the one ``Problem`` schema (so generated clients have one problem
class); the codes it can carry are its examples, one per code, and every example is compared with
what the app really answers in that case (``type``, ``title``, ``status``, ``code``). The
document's ``info.version`` is the package version."""

from __future__ import annotations

import json
import re
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

import keys
from conftest import strong_secret
from api import create_app
from api.problems import PROBLEM_TYPE_BASE
from keys.exc import KeygateError, StoreUnavailable, error_for_code
from keys.ratelimit import RateLimitUnavailable  # also puts it among KeygateError's subclasses

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: Flask-RESTX's own machinery: its static files, its Swagger 2.0 document and its "/" stub.
RESTX_INTERNALS = {"static", "restx_doc.static"}
#: The console's HTML pages (api/console/): for people, not part of the API's document.
CONSOLE = "console."
#: Codes that exist in keys.exc but never reach an HTTP response.
NOT_HTTP_CODES = {"config_error"}
SCHEME_FOR_SOURCE = {"header": "apiKey", "token": "token"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target: Any = spec
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def problem_examples(spec: dict[str, Any], response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """code -> example body, for a problem+json response: its named examples, one per code."""
    media = _resolve(spec, response).get("content", {}).get("application/problem+json")
    if media is None:
        return {}
    return {name: _resolve(spec, example)["value"] for name, example in media.get("examples", {}).items()}


def _problem_codes(spec: dict[str, Any], response: dict[str, Any]) -> tuple[int, set[str]] | None:
    """(status, codes) a problem+json response can carry, as its examples say."""
    examples = problem_examples(spec, response)
    if not examples:
        return None
    statuses = {example["status"] for example in examples.values()}
    assert len(statuses) == 1, f"one response, one status: {statuses}"
    return statuses.pop(), set(examples)


def _error_classes() -> list[type[KeygateError]]:
    out, stack = [], [KeygateError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def http_error_codes() -> dict[str, int]:
    """code -> status for every error the API can answer with (keys/exc.py and subclasses).
    Grouping classes (``BadRequest``, ``AccessDenied``, ...) define no code of their own."""
    return {cls.code: cls.status for cls in _error_classes()
            if "code" in cls.__dict__ and cls.code not in NOT_HTTP_CODES}


# -- the document itself ---------------------------------------------------------


def test_document_is_valid_openapi_3_0(spec: dict[str, Any]) -> None:
    # 3.0.3, not 3.1: the Swagger UI that Flask-RESTX bundles (4.x) renders only 3.0.
    assert spec["openapi"] == "3.0.3"
    validate_spec(spec)


def test_every_error_code_is_in_the_document(spec: dict[str, Any]) -> None:
    global_enum = set(spec["components"]["schemas"]["ProblemCode"]["enum"])
    codes = http_error_codes()
    assert {"store_unavailable", "rate_limit_unavailable"} <= set(codes)  # the walk found them
    assert set(codes) - global_enum == set(), "codes the API emits but ProblemCode lacks"
    assert global_enum - set(codes) == set(), "ProblemCode names codes no error class has"

    # ... and each under a response of its own status, on an operation or (404/405/500, which
    # any path can answer) among the shared responses.
    documented: set[tuple[int, str]] = set()
    responses = [r for _, _, op in _operations(spec) for r in op["responses"].values()]
    responses += spec["components"]["responses"].values()
    for response in responses:
        found = _problem_codes(spec, response)
        if found:
            documented |= {(found[0], code) for code in found[1]}
    missing = {(status, code) for code, status in codes.items()} - documented
    assert not missing, f"error codes without a response of their status: {sorted(missing)}"
    assert {code for _, code in documented} <= global_enum


def test_every_error_response_is_problem_json(spec: dict[str, Any]) -> None:
    for path, method, op in _operations(spec):
        for status, response in op["responses"].items():
            if int(status) >= 400:
                response = _resolve(spec, response)
                assert list(response["content"]) == ["application/problem+json"], (method, path, status)
                assert _problem_codes(spec, response)[0] == int(status), (method, path, status)
                if status == "401":
                    assert response["headers"]["WWW-Authenticate"]["$ref"].endswith("/WWW-Authenticate")
                if status == "429":
                    assert "Retry-After" in response["headers"]


def test_every_error_response_is_the_one_problem_schema(spec: dict[str, Any]) -> None:
    """Not narrowed per response (client generators would make a class per operation and
    status): the shared Problem, with one correct example per code it can carry."""
    validator = OAS30Validator(
        {"$ref": "urn:keygate:openapi#/components/schemas/Problem"},
        registry=Registry().with_resource(
            "urn:keygate:openapi", Resource.from_contents(spec, default_specification=DRAFT4)),
    )
    responses = [(f"{method} {path} {status}", status, r) for path, method, op in _operations(spec)
                 for status, r in op["responses"].items()]
    responses += [(f"components {name}", None, r) for name, r in spec["components"]["responses"].items()]
    checked = 0
    for where, status, response in responses:
        media = _resolve(spec, response).get("content", {}).get("application/problem+json")
        if media is None:
            assert status is None or int(status) < 400, where
            continue
        assert media["schema"] == {"$ref": "#/components/schemas/Problem"}, where
        assert "example" not in media, f"{where}: one named example per code, not one for all"
        examples = problem_examples(spec, response)
        assert examples, f"{where}: no examples"
        for code, body in examples.items():
            errors = list(validator.iter_errors(body))
            assert not errors, f"{where}: example {code}: {errors[0].message}"
            assert body["code"] == code and body["type"] == PROBLEM_TYPE_BASE + code, (where, code)
            assert status is None or body["status"] == int(status), (where, code)
            assert f"`{code}`" in _resolve(spec, response)["description"], f"{where}: the description omits {code}"
            assert body["title"] == error_for_code(code).title, (where, code)
            checked += 1
    assert checked > 100


def test_authenticated_operations_document_every_refusal(spec: dict[str, Any]) -> None:
    auth_errors = {
        "401": {"missing_credentials", "invalid_credentials", "key_revoked", "key_expired",
                "invalid_token", "token_expired"},
        "403": {"insufficient_scope", "ip_not_allowed"},
        "429": {"rate_limited", "auth_throttled"},
        "503": {"store_unavailable", "rate_limit_unavailable"},
    }
    for path, method, op in _operations(spec):
        responses = op["responses"]
        if not op["security"]:
            # (/readyz's 503 is its answer, not a refusal)
            unexpected = {"400", "401", "403", "429", "503"} - ({"503"} if path == "/readyz" else set())
            assert not set(responses) & unexpected, (method, path)
            continue
        for status, codes in auth_errors.items():
            assert status in responses, (method, path, status)
            assert _problem_codes(spec, responses[status])[1] == codes, (method, path, status)
        assert "multiple_credentials" in _problem_codes(spec, responses["400"])[1], (method, path)
        if op.get("parameters") or op.get("requestBody"):
            assert "invalid_request" in _problem_codes(spec, responses["400"])[1], (method, path)


# -- the document against the app ------------------------------------------------


@pytest.fixture
def store() -> keys.MemoryKeyStore:
    return keys.MemoryKeyStore()


@pytest.fixture
def app(store: keys.MemoryKeyStore, tmp_path: Path):  # noqa: ANN201
    return create_app(
        {"DATABASE_URL": "memory://", "SECRET_KEY": strong_secret(),
         "INSTANCE_PATH": str(tmp_path / "instance")},
        store=store,
    )


def served_routes(app) -> dict[tuple[str, str], Any]:  # noqa: ANN001
    """(path, method) -> view function, for every route the app serves, in OpenAPI spelling."""
    out = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in RESTX_INTERNALS or rule.endpoint.startswith(CONSOLE):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out[(path, method.lower())] = app.view_functions[rule.endpoint]
    return out


def route_differences(app, spec: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:  # noqa: ANN001
    """(served but undocumented, documented but not served) as (path, method) pairs."""
    served = set(served_routes(app))
    documented = {(path, method) for path, method, _ in _operations(spec)}
    return served - documented, documented - served


def test_served_routes_and_documented_operations_are_the_same(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    undocumented, unserved = route_differences(app, spec)
    assert not undocumented, f"served but not in openapi.yaml: {sorted(undocumented)}"
    assert not unserved, f"in openapi.yaml but not served: {sorted(unserved)}"


def test_route_check_catches_drift_both_ways(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    """The check above is not vacuous: an extra route or a dropped path shows up."""
    app.add_url_rule("/extra/<int:n>", "extra", lambda n: "", methods=["GET", "PUT"])
    trimmed = {**spec, "paths": {p: v for p, v in spec["paths"].items() if p != "/admin/audit"}}
    undocumented, unserved = route_differences(app, trimmed)
    assert undocumented == {("/extra/{n}", "get"), ("/extra/{n}", "put"), ("/admin/audit", "get")}
    assert unserved == set()
    rotate = spec["paths"]["/admin/keys/{key_id}/rotate"]
    extra = {**spec, "paths": {**spec["paths"], "/admin/keys/{key_id}/rotate": {**rotate, "get": rotate["post"]}}}
    assert route_differences(app, extra)[1] == {("/admin/keys/{key_id}/rotate", "get")}


def test_security_per_operation_matches_the_code(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    """Each operation's security schemes are exactly the credential sources its view accepts."""
    for (path, method), view in served_routes(app).items():
        resource = getattr(view, "view_class", None)
        handler = getattr(resource, method, None) if resource else None
        accepted = getattr(handler, "accepted_sources", ())
        expected = [{SCHEME_FOR_SOURCE[s]: []} for s in accepted]
        op = spec["paths"].get(path, {}).get(method)
        if op is not None:  # an undocumented route fails the route test instead
            assert op["security"] == expected, (method, path)


def test_docs_authorize_offers_the_header_and_the_query_token(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    client = app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200
    # /docs shows openapi.yaml (served as /openapi.json), not Flask-RESTX's own Swagger 2.0
    # document, so its Authorize dialog offers the security schemes of the full contract.
    assert re.search(r'\burl: "/openapi\.json"', page.get_data(as_text=True)), "Swagger UI is not shown /openapi.json"
    shown = client.get("/openapi.json").get_json()["components"]["securitySchemes"]

    def essentials(schemes: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
        return {name: (d["type"], d["in"], d["name"]) for name, d in schemes.items()}

    assert essentials(shown) == essentials(spec["components"]["securitySchemes"]) == {
        "apiKey": ("apiKey", "header", "API-Key"), "token": ("apiKey", "query", "token")}
    # The Authorize dialog shows each scheme's description: both say not to authorise both.
    for scheme in shown.values():
        assert "multiple_credentials" in scheme["description"], scheme


def test_only_the_openapi_3_document_is_served(app) -> None:  # noqa: ANN001
    """Flask-RESTX's Swagger 2.0 /swagger.json is not served: one document, so a client
    generator can't pick the lesser one."""
    client = app.test_client()
    gone = client.get("/swagger.json")
    assert gone.status_code == 404 and gone.mimetype == "application/problem+json"
    assert client.get("/openapi.json").status_code == 200


def test_the_root_redirects_to_the_docs(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    client = app.test_client()
    for method in (client.get, client.head):
        resp = method("/")
        assert resp.status_code == 302 and resp.headers["Location"] == "/docs"
    assert client.get("/", follow_redirects=True).status_code == 200
    assert spec["paths"]["/"]["get"]["responses"]["302"]["headers"]["Location"]["schema"]["enum"] == ["/docs"]
    problem = client.post("/")
    assert problem.status_code == 405 and problem.mimetype == "application/problem+json"


def test_servers_tell_clients_the_base_url(spec: dict[str, Any]) -> None:
    """A relative server: right for Swagger UI and for a client fetching /openapi.json from
    wherever keygate is served."""
    assert spec["servers"][0]["url"] == "/"


def test_every_version_is_the_package_version(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    """openapi.yaml (as served), and the installed package say pyproject.toml's version,
    and CHANGELOG.md has an entry for it (see the README's "Versions")."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert spec["info"]["version"] == version
    assert metadata.version("keygate") == version, "reinstall: pip install -e '.[test]'"
    assert app.test_client().get("/openapi.json").get_json()["info"]["version"] == version
    assert re.search(rf"^## {re.escape(version)}\b", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)


def test_openapi_json_serves_the_document(app, spec: dict[str, Any]) -> None:  # noqa: ANN001
    resp = app.test_client().get("/openapi.json")
    assert resp.status_code == 200
    assert resp.mimetype == "application/json"
    assert json.loads(resp.get_data()) == spec
    assert app.test_client().head("/openapi.json").status_code == 200


def test_openapi_json_without_the_file_is_a_problem(tmp_path: Path) -> None:
    from flask import Flask

    from api import openapi
    from api.problems import register_problem_handlers

    bare = Flask(__name__)
    openapi.register(bare, tmp_path / "openapi.yaml")
    register_problem_handlers(bare)
    resp = bare.test_client().get("/openapi.json")
    assert resp.status_code == 404
    assert resp.get_json(force=True)["code"] == "not_found"


# -- what the real app answers conforms to the document ----------------------------


class Conformance:
    """Checks one response against the operation it answers (or a shared response)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        #: (response pointer, code) of every problem example a real answer was compared with.
        self.matched: set[tuple[str, str]] = set()
        # OpenAPI 3.0 schemas are a JSON Schema draft 4/5 dialect (`nullable`, no type arrays).
        self.registry = Registry().with_resource(
            "urn:keygate:openapi", Resource.from_contents(spec, default_specification=DRAFT4)
        )

    def _validator(self, pointer: str) -> OAS30Validator:
        return OAS30Validator({"$ref": f"urn:keygate:openapi#{pointer}"}, registry=self.registry)

    def check(self, resp, method: str, path: str | None, shared: str | None = None) -> None:  # noqa: ANN001
        if shared is not None:
            pointer, response = f"/components/responses/{shared}", self.spec["components"]["responses"][shared]
        else:
            assert method in self.spec["paths"].get(path, {}), f"{method.upper()} {path} is not documented"
            responses = self.spec["paths"][path][method]["responses"]
            status = str(resp.status_code)
            assert status in responses, f"{method.upper()} {path}: undocumented {status}: {resp.get_data(as_text=True)}"
            escaped = path.replace("~", "~0").replace("/", "~1")
            pointer, response = f"/paths/{escaped}/{method}/responses/{status}", responses[status]
            while "$ref" in response:
                pointer, response = response["$ref"][1:], _resolve(self.spec, {"$ref": response["$ref"]})
        where = f"{method.upper()} {path or shared} -> {resp.status_code}"
        for name, header in response.get("headers", {}).items():
            header = _resolve(self.spec, header)
            value = resp.headers.get(name)
            if value is None:
                assert not header.get("required"), f"{where}: missing required header {name}"
                continue
            schema = header["schema"]
            if schema.get("type") == "integer":
                assert re.fullmatch(r"[0-9]+", value), f"{where}: {name}: {value!r}"
                value = int(value)
            errors = list(OAS30Validator(schema).iter_errors(value))
            assert not errors, f"{where}: header {name}: {errors[0].message}"
        content = response.get("content")
        if not content:
            assert resp.get_data() == b"", f"{where}: body where none is documented"
            return
        assert resp.mimetype in content, f"{where}: content type {resp.mimetype} not in {list(content)}"
        if resp.mimetype.endswith("json"):
            media_pointer = f"{pointer}/content/{resp.mimetype.replace('/', '~1')}/schema"
            body = json.loads(resp.get_data())
            errors = list(self._validator(media_pointer).iter_errors(body))
            assert not errors, f"{where}: {errors[0].message} at {list(errors[0].absolute_path)}"
            if resp.mimetype == "application/problem+json":
                self._check_problem_example(where, pointer, response, body)
            elif "message" in content[resp.mimetype].get("example", {}):  # the pages' fixed messages
                assert body["message"] == content[resp.mimetype]["example"]["message"], where
        assert resp.headers["X-Content-Type-Options"] == "nosniff"

    def _check_problem_example(self, where: str, pointer: str, response: dict[str, Any],
                               body: dict[str, Any]) -> None:
        """The code is one the response documents, and its example says what the server says."""
        examples = problem_examples(self.spec, response)
        assert body["code"] in examples, f"{where}: {body['code']} is not among {sorted(examples)}"
        example = examples[body["code"]]
        for member in ("type", "title", "status", "code"):
            assert body[member] == example[member], (
                f"{where}: the {body['code']} example's {member} is {example[member]!r}; "
                f"the server sent {body[member]!r}")
        self.matched.add((pointer, body["code"]))


def test_the_app_answers_as_documented(app, store: keys.MemoryKeyStore, spec: dict[str, Any],  # noqa: ANN001
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    conformance = Conformance(spec)
    check = conformance.check
    client = app.test_client()
    seen: set[tuple[str, str, int]] = set()

    def call(method: str, path: str, url: str | None = None, expect: int | None = None,
             code: str | None = None, **kw: Any):  # noqa: ANN202
        resp = client.open(url or path, method=method.upper(), **kw)
        check(resp, method, path)
        if expect is not None:
            assert resp.status_code == expect, (method, url or path, resp.get_data(as_text=True))
        if code is not None:
            assert resp.get_json(force=True)["code"] == code
        seen.add((method, path, resp.status_code))
        return resp

    def issue(**kw: Any) -> keys.IssuedKey:
        kw.setdefault("name", "t")
        return keys.issue_key(store, actor="test", **kw)

    admin = {"API-Key": issue(scopes=["admin"]).plaintext}
    reader = issue(scopes=["secret:read", "data:read"])
    rh = {"API-Key": reader.plaintext}
    signer = app.extensions["keygate.signer"]

    # service
    call("get", "/healthz", expect=200)
    call("get", "/readyz", expect=200)
    call("get", "/openapi.json", expect=200)
    call("get", "/docs", expect=200)
    call("get", "/", expect=302)

    # pages, and every way to be refused
    call("get", "/secret", headers=rh, expect=200)
    call("get", "/data", headers=rh, expect=200)
    call("get", "/admin", headers=admin, expect=200)
    metrics_reader = {"API-Key": issue(scopes=["metrics:read"]).plaintext}
    call("get", "/metrics", headers=metrics_reader, expect=200)
    call("get", "/metrics", headers=rh, expect=403, code="insufficient_scope")
    token = call("post", "/tokens", headers=rh, json={"scopes": ["data:read"], "ttl": 60}, expect=201).get_json()
    call("get", "/data", url=f"/data?token={token['token']}", expect=200)
    call("get", "/secret", expect=401, code="missing_credentials")
    call("get", "/secret", headers={"API-Key": "kg_nope"}, expect=401, code="invalid_credentials")
    revoked = issue(scopes=["secret:read"])
    keys.revoke_key(store, revoked.record.id, actor="test")
    call("get", "/secret", headers={"API-Key": revoked.plaintext}, expect=401, code="key_revoked")
    expired = issue(scopes=["secret:read"], expires_in=10, now=time.time() - 100)
    call("get", "/secret", headers={"API-Key": expired.plaintext}, expect=401, code="key_expired")
    call("get", "/data", url="/data?token=garbage", expect=401, code="invalid_token")
    old = signer.mint(reader.record, ttl=10, now=time.time() - 100).token
    call("get", "/data", url=f"/data?token={old}", expect=401, code="token_expired")
    call("get", "/data", url=f"/data?token={token['token']}", headers=rh, expect=400, code="multiple_credentials")
    call("get", "/secret", url=f"/secret?token={token['token']}", expect=403, code="insufficient_scope")
    call("get", "/admin", headers=rh, expect=403, code="insufficient_scope")
    fenced = issue(scopes=["secret:read"], allowed_ips=["10.0.0.0/8"])
    call("get", "/secret", headers={"API-Key": fenced.plaintext}, expect=403, code="ip_not_allowed")
    limited = {"API-Key": issue(scopes=["secret:read"], rate_limit="1/minute").plaintext}
    call("get", "/secret", headers=limited, expect=200)
    call("get", "/secret", headers=limited, expect=429, code="rate_limited")
    guesser = {"REMOTE_ADDR": "198.51.100.9"}  # an address of its own: 30 guesses, then even a good key
    for _ in range(30):
        call("get", "/secret", headers={"API-Key": "kg_guess"}, environ_base=guesser, expect=401)
    call("get", "/secret", headers=rh, environ_base=guesser, expect=429, code="auth_throttled")

    # tokens
    call("post", "/tokens", headers=rh, expect=201)
    call("post", "/tokens", headers=rh, json={"ttl": -1}, expect=400, code="invalid_request")
    call("post", "/tokens", headers=rh, json={"ttl": "15m"}, expect=201)
    call("post", "/tokens", headers=rh, json={"ttl": "300"}, expect=201)
    call("post", "/tokens", url=f"/tokens?token={token['token']}", headers=rh, expect=400,
         code="multiple_credentials")
    call("post", "/tokens", headers=rh, json={"scopes": ["admin"]}, expect=403, code="insufficient_scope")
    call("post", "/tokens", headers={**rh, "Content-Type": "application/json"}, data=b" " * 65537,
         expect=413, code="payload_too_large")

    # key management
    created = call("post", "/admin/keys", headers=admin, expect=201, json={
        "name": "billing", "scopes": ["data:read"], "expires_in": "90d", "rate_limit": "100/minute",
        "allowed_ips": ["10.0.0.0/8", "2001:db8::/32"]}).get_json()
    call("post", "/admin/keys", headers=admin, json={"name": "n", "scopes": ["data:read"], "expires_in": 3600},
         expect=201)
    call("post", "/admin/keys", headers=admin, json={"name": "x"}, expect=400, code="invalid_request")
    call("post", "/admin/keys", headers=rh, json={"name": "x", "scopes": ["admin"]}, expect=403)
    page = call("get", "/admin/keys", url="/admin/keys?limit=2", headers=admin, expect=200).get_json()
    call("get", "/admin/keys", url=f"/admin/keys?after={page['next']}", headers=admin, expect=200)
    call("get", "/admin/keys", url="/admin/keys?limit=0", headers=admin, expect=400, code="invalid_request")
    item = "/admin/keys/{key_id}"
    call("get", item, url=f"/admin/keys/{created['id']}", headers=admin, expect=200)
    call("get", item, url="/admin/keys/AAAAAAAAAAAA", headers=admin, expect=404, code="not_found")
    call("get", item, url=f"/admin/keys/{reader.plaintext}", headers=admin, expect=404, code="not_found")
    rotated = call("post", item + "/rotate", url=f"/admin/keys/{created['id']}/rotate", headers=admin,
                   json={"grace": "1h"}, expect=201).get_json()
    assert rotated["replaces"] == created["id"]
    call("post", item + "/rotate", url=f"/admin/keys/{created['id']}/rotate", headers=admin,
         expect=409, code="conflict")
    call("post", item + "/rotate", url="/admin/keys/AAAAAAAAAAAA/rotate", headers=admin, expect=404)
    edited = call("patch", item, url=f"/admin/keys/{rotated['id']}", headers=admin, expect=200,
                  json={"scopes": ["data:read"], "expires_in": None, "rate_limit": "5/minute"}).get_json()
    assert edited["rate_limit"] == "5/minute" and edited["expires_at"] is None
    call("patch", item, url=f"/admin/keys/{rotated['id']}", headers=admin, json={"scope": ["admin"]},
         expect=400, code="invalid_request")
    call("patch", item, url="/admin/keys/AAAAAAAAAAAA", headers=admin, json={}, expect=404, code="not_found")
    call("patch", item, url=f"/admin/keys/{created['id']}", headers=admin, json={"name": "x"}, expect=409,
         code="conflict")
    usage = "/admin/keys/{key_id}/usage"
    call("get", usage, url=f"/admin/keys/{rotated['id']}/usage?interval=day", headers=admin, expect=200)
    call("get", usage, url=f"/admin/keys/{rotated['id']}/usage?from=yesterday", headers=admin, expect=400,
         code="invalid_request")
    call("get", usage, url="/admin/keys/AAAAAAAAAAAA/usage", headers=admin, expect=404, code="not_found")
    call("delete", item, url=f"/admin/keys/{rotated['id']}", headers=admin, expect=204)
    call("delete", item, url=f"/admin/keys/{rotated['id']}", headers=admin, expect=204)
    call("delete", item, url="/admin/keys/AAAAAAAAAAAA", headers=admin, expect=404)
    events = call("get", "/admin/audit", url="/admin/audit?limit=2", headers=admin, expect=200).get_json()
    call("get", "/admin/audit", url=f"/admin/audit?before={events['next']}&key_id={created['id']}",
         headers=admin, expect=200)
    call("get", "/admin/audit", url="/admin/audit?key_id=nope", headers=admin, expect=400)

    # outages: 503 from the key store and from the rate-limit store
    def down(*_: Any, **__: Any) -> None:
        raise StoreUnavailable("the key store is unreachable; try again shortly")

    with monkeypatch.context() as m:
        m.setattr(store, "get", down)
        call("get", "/secret", headers=rh, expect=503, code="store_unavailable")
    limiter = app.extensions["keygate.ratelimits"].limiter

    def limiter_down(*_: Any, **__: Any) -> None:
        raise RateLimitUnavailable("the rate-limit store is unreachable")

    with monkeypatch.context() as m:
        m.setattr(limiter, "hit", limiter_down)
        m.setattr(limiter, "hit_unless", limiter_down)
        call("get", "/admin/keys", headers=admin, expect=503, code="rate_limit_unavailable")
    with monkeypatch.context() as m:  # readiness: a probe that fails, for each backend
        m.setattr(limiter, "ping", limiter_down)
        call("get", "/readyz", expect=503, code="rate_limit_unavailable")
        m.setattr(store, "revision", down)
        call("get", "/readyz", expect=503, code="store_unavailable")

    # every documented operation was exercised at least once
    documented = {(path, method) for path, method, _ in _operations(spec)}
    assert documented <= {(p, m) for m, p, _ in seen}

    # paths and methods that don't exist: the shared 404 and 405 responses
    resp = client.get("/nope")
    check(resp, "get", None, shared="NotFound")
    assert resp.status_code == 404
    resp = client.post("/secret", headers=rh)
    check(resp, "post", None, shared="MethodNotAllowed")
    assert resp.status_code == 405
    assert resp.headers["Allow"]

    # a bug: the shared 500 response
    def bug(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug")

    with monkeypatch.context() as m:
        m.setattr(store, "get", bug)
        resp = client.get("/secret", headers=rh)
    check(resp, "get", None, shared="InternalError")
    assert resp.status_code == 500

    # every error example in the document was compared with a real answer of its kind
    examples = {(f"/components/responses/{name}", code) for name, response in spec["components"]["responses"].items()
                for code in problem_examples(spec, response)}
    assert examples - conformance.matched == set(), "error examples no request here produced"
