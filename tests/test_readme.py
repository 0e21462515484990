"""The README's curl examples, run as written against a real server, so the documentation can't rot.

Extracted from README.md, not copied here: every ```bash block under "## Using it", in order,
in one bash session (so ``KEY=$(…)`` and ``TOKEN=$(…)`` carry over as they would for a reader),
and every row of the error table whose "try it" cell is a runnable curl command. The only
changes made to them: the reader's placeholders get real values (``ADMIN=kg_...`` the admin key,
the example key id ``Xk3v9QpL2mZa`` a real key's id, ``http://127.0.0.1:5000`` the server's URL,
``.venv/bin/python`` this interpreter), and ``curl`` is a shell function that records each
response (status, headers, body) on the way through.

What each must answer: a block followed by a ```json block must print that JSON (a
placeholder id there stands for the id of the key the request sent, the example request id for
the one the server generated); every other command under
"Using it" must succeed (2xx); a table row must answer its status and one of its codes, and
carry any header its note names ("with `Allow`").
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import REQUIRE_SERVICES, ROOT, run_cli

README = ROOT / "README.md"
README_URL = "http://127.0.0.1:5000"
PLACEHOLDER_ID = "Xk3v9QpL2mZa"
PLACEHOLDER_REQUEST_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # stands for any generated request id
PLACEHOLDER_ADMIN = re.compile(r"\bkg_\.\.\.")

pytestmark = pytest.mark.slow


# -- reading the README ------------------------------------------------------------------


@dataclass
class Block:
    """A ```bash block, and the ```json block right after it, if any (what it prints)."""

    code: str
    prints: Any = None
    line: int = 0

    @property
    def curl_count(self) -> int:
        commands = re.sub(r"#[^\n]*", "", self.code)  # comments don't run
        return len(re.findall(r"(?:^|[\s;|&(])curl\s", commands))


@dataclass
class Row:
    status: int
    codes: set[str]
    command: str
    after: str | None = None  # a manage.py step to run first ("after `manage.py revoke-key ID`")
    headers: list[str] = field(default_factory=list)  # headers the note names ("with `Allow`")


def section(text: str, heading: str) -> str:
    """The text under a ``## heading``, up to the next heading of the same level (preceded by
    as many empty lines as came before it, so line numbers in it are README.md's)."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return "\n" * text[: m.start(1)].count("\n") + m.group(1)


def bash_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    fences = list(re.finditer(r"^```(\w*)\n(.*?)^```\s*$", text, flags=re.M | re.S))
    for i, fence in enumerate(fences):
        if fence.group(1) != "bash":
            continue
        block = Block(fence.group(2), line=text[: fence.start()].count("\n") + 1)
        following = fences[i + 1] if i + 1 < len(fences) else None
        if following and following.group(1) == "json" and not text[fence.end(): following.start()].strip():
            block.prints = json.loads(following.group(2))
        blocks.append(block)
    return blocks


def error_rows(text: str) -> list[Row]:
    """Rows of the ``| status | `code` | try it |`` table whose "try it" is a curl command."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        status, codes, try_it = int(cells[0]), set(re.findall(r"`([a-z_]+)`", cells[1])), cells[2]
        m = re.fullmatch(r"`(curl [^`]+)`(.*)", try_it)
        if not m:  # "a key created with --expires-in 90s, 90 s later" and the like: not runnable
            continue
        note = m.group(2)
        after = re.search(r"\bafter `(?:\S*/)?(manage\.py [^`]+)`", note)
        rows.append(Row(status, codes, m.group(1), after.group(1) if after else None,
                        re.findall(r"\bwith `([A-Za-z-]+)`", note)))
    return rows


def test_the_readme_has_examples_to_run() -> None:
    """The extraction finds what it should (a README rewrite that drops them fails here)."""
    using = section(README.read_text(), "Using it")
    blocks = bash_blocks(using)
    assert sum(b.curl_count for b in blocks) >= 12
    assert sum(b.prints is not None for b in blocks) >= 2
    rows = error_rows(using)
    assert {r.status for r in rows} >= {400, 401, 403, 404, 405}
    assert {"missing_credentials", "invalid_credentials", "key_revoked", "invalid_token",
            "method_not_allowed"} <= set().union(*(r.codes for r in rows))


# -- running them ------------------------------------------------------------------------


@dataclass
class Response:
    args: list[str]
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def sent_key_id(self) -> str | None:
        for arg in self.args:
            m = re.fullmatch(r"API-Key: kg_([0-9A-Za-z]{12})[0-9A-Za-z]{38}", arg)
            if m:
                return m.group(1)
        return None

    def __str__(self) -> str:
        return f"curl {shlex.join(self.args)} -> {self.status} {self.body[:300]!r}"


class Bash:
    """Runs README text in bash, with ``curl`` recording every response under ``log``."""

    PRELUDE = r"""
set -euo pipefail
__log=%(log)s
echo 0 > "$__log/count"
curl() {
  local n
  n=$(( $(cat "$__log/count") + 1 ))
  echo "$n" > "$__log/count"
  printf '%%s\0' "$@" > "$__log/$n.args"
  command curl --max-time 20 -D "$__log/$n.headers" -o "$__log/$n.body" -w '%%{http_code}' "$@" > "$__log/$n.status"
  cat "$__log/$n.body"
}
__mark() { cat "$__log/count" > "$__log/mark.$1"; }
"""

    def __init__(self, log: Path, env: dict[str, str], url: str) -> None:
        self.log, self.env, self.url = log, env, url
        log.mkdir(parents=True, exist_ok=True)

    def adapt(self, code: str, substitutions: dict[str, str]) -> str:
        code = code.replace(README_URL, self.url).replace(".venv/bin/python", shlex.quote(sys.executable))
        for placeholder, value in substitutions.items():
            code = code.replace(placeholder, value)
        return code

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        full = self.PRELUDE % {"log": shlex.quote(str(self.log))} + script
        return subprocess.run(["bash", "-c", full], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    def responses(self) -> list[Response]:
        out = []
        for n in range(1, int((self.log / "count").read_text()) + 1):
            raw_headers = (self.log / f"{n}.headers").read_text(errors="replace").splitlines()
            headers = dict(h.split(":", 1) for h in raw_headers if ":" in h)
            out.append(Response(
                args=(self.log / f"{n}.args").read_bytes().decode().split("\0")[:-1],
                status=int((self.log / f"{n}.status").read_text() or 0),
                headers={k.strip().lower(): v.strip() for k, v in headers.items()},
                body=(self.log / f"{n}.body").read_bytes(),
            ))
        return out

    def mark(self, name: str) -> int:
        return int((self.log / f"mark.{name}").read_text())


@pytest.fixture
def readme_server(env: dict[str, str], start_server):  # noqa: ANN001, ANN201
    if shutil.which("curl") is None:
        if REQUIRE_SERVICES:
            pytest.fail("curl is not installed and KEYGATE_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("curl is not installed")
    init = run_cli(env, "init", "--json")
    assert init.returncode == 0, init.stderr
    admin = json.loads(init.stdout)["admin_key"]["key"]
    return start_server(), admin


def _create_key(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_cli(env, "create-key", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _matches(expected: Any, actual: Any, key_id: str | None) -> bool:
    """Equal, where the placeholder key id stands for the id of the key the request sent."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and expected.keys() == actual.keys() and all(
            _matches(v, actual[k], key_id) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _matches(e, a, key_id) for e, a in zip(expected, actual))
    if expected == PLACEHOLDER_ID:
        return actual == key_id
    if expected == PLACEHOLDER_REQUEST_ID:
        return isinstance(actual, str) and re.fullmatch(r"[0-9a-f]{32}", actual) is not None
    return expected == actual


def test_the_using_it_examples(readme_server, env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    server, admin = readme_server
    example = _create_key(env, "--name", "example", "--scope", "data:read")  # the Xk3v9QpL2mZa of the commands
    blocks = bash_blocks(section(README.read_text(), "Using it"))
    bash = Bash(tmp_path / "curl", env, server.url)
    subs = {PLACEHOLDER_ID: example["id"]}
    script = ""
    for i, block in enumerate(blocks):
        code = PLACEHOLDER_ADMIN.sub(admin, block.code)
        script += f"\n__mark {i}\n# README.md line {block.line}\n{bash.adapt(code, subs)}\n"
    script += f"\n__mark {len(blocks)}\n"
    done = bash.run(script)
    assert done.returncode == 0, f"the examples failed:\n{done.stderr}\n{server.output()[-2000:]}"
    responses = bash.responses()

    for i, block in enumerate(blocks):
        ran = responses[bash.mark(str(i)): bash.mark(str(i + 1))]
        where = f"README.md line {block.line}"
        assert len(ran) == block.curl_count, f"{where}: {len(ran)} of {block.curl_count} curl commands ran"
        for n, response in enumerate(ran):
            last = n == len(ran) - 1
            if block.prints is not None and last:
                expected_status = block.prints.get("status", 200) if isinstance(block.prints, dict) else 200
                assert response.status == expected_status, f"{where}: {response}"
                assert _matches(block.prints, response.json(), response.sent_key_id()), (
                    f"{where}: printed {response.body!r}, the README shows {json.dumps(block.prints)}")
            else:
                assert 200 <= response.status < 300, f"{where}: {response}"
    # The examples did what they say: the example key was rotated, then revoked.
    shown = run_cli(env, "show-key", example["id"], "--json")
    assert json.loads(shown.stdout)["revoked_at"] is not None


def test_the_error_table(readme_server, env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    server, admin = readme_server
    rows = error_rows(section(README.read_text(), "Using it"))
    failures = []
    # A key like the README's "reporting" key, and a token minted from it.
    shared = _create_key(env, "--name", "reporting", "--scope", "secret:read", "--scope", "data:read")
    minted = run_cli(env, "mint-token", shared["id"], "--scope", "data:read", "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)["token"]
    for n, row in enumerate(rows):
        key = shared
        if row.after:  # e.g. "after `manage.py revoke-key ID`": on a key of its own
            key = _create_key(env, "--name", f"row-{n}", "--scope", "secret:read", "--scope", "data:read")
            step = shlex.split(row.after.replace(" ID", " " + key["id"]))
            assert run_cli(env, *step[1:]).returncode == 0, row.after
        bash = Bash(tmp_path / f"row-{n}", env, server.url)
        variables = {"ADMIN": admin, "KEY": key["key"], "TOKEN": token}
        preamble = "".join(f"{name}={shlex.quote(value)}\n" for name, value in variables.items())
        done = bash.run(preamble + bash.adapt(row.command, {PLACEHOLDER_ID: key["id"]}) + "\n")
        responses = bash.responses() if done.returncode == 0 else []
        if len(responses) != 1:
            failures.append(f"{row.command}: did not run ({done.stderr.strip()})")
            continue
        response = responses[0]
        problem = response.json() if response.body else {}
        if response.status != row.status or problem.get("code") not in row.codes:
            failures.append(f"{row.command}: expected {row.status} {sorted(row.codes)}, got {response}")
        for header in row.headers:
            if header.lower() not in response.headers:
                failures.append(f"{row.command}: no {header} header")
    assert not failures, "\n".join(failures)
    assert len(rows) >= 8
