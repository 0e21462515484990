"""openapi.yaml as people who call keygate from code use it: through a generated client.

openapi-python-client (a test dependency; it runs offline) generates a client from the
repository's openapi.yaml into a temporary directory, exactly as the README's "Calling keygate
from code" does from a server's /openapi.json. The client must read as if written by hand: a
handful of models named for what they are, one ``Problem`` for every error of every operation,
nothing named ``*Response<status>``. Then the README's key lifecycle runs through it against a
real server: create a key as admin, call /secret, list, mint a query token and use it on /data
(the token travels as the ``token`` query parameter, through the client's own ``httpx_args``),
rotate with grace, revoke, and the refusal is caught as the shared ``Problem`` with
``code == "key_revoked"``. The README's Python block runs too, as written.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from conftest import ROOT, invoke_cli
from test_readme import README, section

SPEC_PATH = ROOT / "openapi.yaml"
PACKAGE = "keygate_client"  # openapi-python-client names it after info.title
MAX_MODEL_FILES = 40

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("generated_client")]  # one worker: the client is generated once


def generate(cwd: Path, *args: str) -> Path:
    """Runs ``openapi-python-client generate ARGS`` in ``cwd``; the project directory it wrote."""
    # The interpreter's bin directory first: the generator formats its output with ruff, found on PATH.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    done = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", *args, "--fail-on-warning"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the generator failed:\n{done.stdout}\n{done.stderr}"
    project = cwd / "keygate-client"
    assert (project / PACKAGE / "__init__.py").is_file(), done.stdout
    return project


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client generated from the repository's openapi.yaml."""
    return generate(tmp_path_factory.mktemp("generated"), "--path", str(SPEC_PATH))


@pytest.fixture(scope="module")
def client_package(project: Path) -> Iterator[ModuleType]:
    """The generated package, imported (and forgotten again afterwards)."""
    sys.path.insert(0, str(project))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(project))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


@pytest.fixture
def server_and_admin(env: dict[str, str], start_server) -> tuple[Any, str]:  # noqa: ANN001
    init = invoke_cli(env, "init", "--json")
    assert init.returncode == 0, init.stderr
    return start_server(), json.loads(init.stdout)["admin_key"]["key"]


# -- what the generator makes of the document ---------------------------------------------


def _classes(directory: Path) -> dict[str, Path]:
    return {m.group(1): f for f in directory.rglob("*.py")
            for m in re.finditer(r"^class (\w+)\b", f.read_text(), flags=re.M)}


def test_the_client_has_few_models_named_for_what_they_are(project: Path) -> None:
    models = project / PACKAGE / "models"
    files = sorted(f.name for f in models.glob("*.py") if f.name != "__init__.py")
    print(f"generated client: {len(files)} model files: {', '.join(files)}")
    assert len(files) <= MAX_MODEL_FILES, files
    classes = _classes(models)
    assert {"Problem", "ProblemCode", "KeyMetadata", "NewKey", "KeyList", "Token", "Page", "AuditPage"} <= set(classes)
    assert sorted(c for c in classes if "problem" in c.lower()) == ["Problem", "ProblemCode"]
    named_for_a_status = [c for c in [*classes, *files] if re.search(r"Response_?\d{3}", c, flags=re.I)]
    assert not named_for_a_status, named_for_a_status


def test_every_error_of_every_operation_parses_into_problem(project: Path) -> None:
    """Each operation module turns each documented 4xx/5xx into the one shared Problem."""
    parsed: dict[str, set[str]] = {}
    for module in (project / PACKAGE / "api").rglob("*.py"):
        for status, cls in re.findall(r"response_(\d{3}) = (\w+)\.from_dict", module.read_text()):
            if int(status) >= 400:
                parsed.setdefault(cls, set()).add(f"{module.stem} {status}")
    assert set(parsed) == {"Problem"}, parsed
    assert len(parsed["Problem"]) >= 50  # every authenticated operation's 400/401/403/429/503


def test_the_served_document_generates_the_same_client(project: Path, server_and_admin,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    """The README's way (--url against a server) makes the client the tests use (--path)."""
    server, _ = server_and_admin
    block = re.search(r"```bash\n(.*?)```", section(README.read_text(), "Calling keygate from code"), re.S)
    assert block, "the README shows no generate command"
    command = next(line for line in block.group(1).splitlines() if "openapi-python-client generate" in line)
    args = command.split("#")[0].split()[2:]
    assert args == ["--url", "http://127.0.0.1:5000/openapi.json"], command
    from_url = generate(tmp_path, "--url", server.url + "/openapi.json")

    def tree(root: Path) -> dict[str, str]:
        return {str(f.relative_to(root)): f.read_text() for f in root.rglob("*.py")}

    assert tree(from_url) == tree(project)


# -- the key lifecycle through it ----------------------------------------------------------


def test_the_key_lifecycle_through_the_generated_client(client_package: ModuleType, server_and_admin) -> None:  # noqa: ANN001
    server, admin_key = server_and_admin
    from keygate_client import AuthenticatedClient, Client
    from keygate_client.api.keys import create_key, get_key, list_keys, revoke_key, rotate_key
    from keygate_client.api.pages import get_data, get_secret
    from keygate_client.api.tokens import mint_token
    from keygate_client.models import (
        CallerVia, CreateKey, KeyList, KeyMetadata, NewKey, Page, Problem, ProblemCode, RotateKey, Scope,
        Token, TokenRequest,
    )

    def keygate(key: str) -> AuthenticatedClient:
        return AuthenticatedClient(base_url=server.url, token=key, prefix="", auth_header_name="API-Key")

    admin = keygate(admin_key)
    new = create_key.sync(client=admin, body=CreateKey(name="reporting", scopes=[Scope.SECRETREAD, Scope.DATAREAD]))
    assert isinstance(new, NewKey) and new.key.startswith("kg_") and new.scopes == [Scope.SECRETREAD, Scope.DATAREAD]
    me = keygate(new.key)

    page = get_secret.sync(client=me)
    assert isinstance(page, Page) and page.message == "Welcome to the secret page!"
    assert page.caller.id == new.id and page.caller.via == CallerVia.HEADER

    listed = list_keys.sync(client=admin)
    assert isinstance(listed, KeyList) and new.id in [k.id for k in listed.keys]
    assert all(isinstance(k, KeyMetadata) for k in listed.keys)

    # A query token on /data: the `token` query parameter, sent by the client's httpx_args.
    token = mint_token.sync(client=me, body=TokenRequest(scopes=[Scope.DATAREAD], ttl=300))
    assert isinstance(token, Token) and token.scopes == [Scope.DATAREAD]
    by_token = Client(base_url=server.url, httpx_args={"params": {"token": token.token}})
    data = get_data.sync(client=by_token)  # type: ignore[arg-type]
    assert isinstance(data, Page) and data.caller.via == CallerVia.TOKEN and data.caller.scopes == [Scope.DATAREAD]

    # Rotate with grace: the new key works, the old one still does until it is revoked.
    rotated = rotate_key.sync(new.id, client=admin, body=RotateKey(grace="1h"))
    assert isinstance(rotated, NewKey) and rotated.replaces == new.id
    assert isinstance(get_secret.sync(client=keygate(rotated.key)), Page)
    assert isinstance(get_secret.sync(client=me), Page)  # in its grace period
    old = get_key.sync(new.id, client=admin)
    assert isinstance(old, KeyMetadata) and old.revoked_at is not None  # the end of the grace period
    expired_token = get_data.sync(client=by_token)  # type: ignore[arg-type]
    assert isinstance(expired_token, Problem) and expired_token.code == ProblemCode.INVALID_TOKEN

    revoked = revoke_key.sync_detailed(new.id, client=admin)
    assert revoked.status_code == 204
    refused = get_secret.sync_detailed(client=me)
    assert refused.status_code == 401
    assert isinstance(refused.parsed, Problem) and refused.parsed.code == ProblemCode.KEY_REVOKED
    assert refused.parsed.type_ == "tag:keygate,2026:problem/key_revoked" and refused.parsed.status == 401
    assert refused.headers["WWW-Authenticate"] == 'ApiKey realm="keygate", error="invalid_token"'

    # Other refusals of other operations: the same class.
    missing = get_key.sync("AAAAAAAAAAAA", client=admin)
    assert isinstance(missing, Problem) and missing.code == ProblemCode.NOT_FOUND
    denied = list_keys.sync(client=keygate(rotated.key))
    assert isinstance(denied, Problem) and denied.code == ProblemCode.INSUFFICIENT_SCOPE
    bad = create_key.sync(client=admin, body=CreateKey(name="x", scopes=[Scope.DATAREAD], rate_limit="0/minute"))
    assert isinstance(bad, Problem) and bad.code == ProblemCode.INVALID_REQUEST and bad.status == 400


def test_the_readme_block_runs_as_written(project: Path, server_and_admin) -> None:  # noqa: ANN001
    server, admin_key = server_and_admin
    text = section(README.read_text(), "Calling keygate from code")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block, "the README shows no Python block"
    code = block.group(1)
    assert code.count('"kg_..."') == 1 and code.count('"http://127.0.0.1:5000"') == 1
    code = code.replace('"kg_..."', repr(admin_key)).replace('"http://127.0.0.1:5000"', repr(server.url))
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(project)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{server.output()[-2000:]}"
    printed = done.stdout.splitlines()
    assert printed[0] == "Welcome to the secret page!", printed
    assert "reporting" in printed[1] and printed[2] == "token", printed
