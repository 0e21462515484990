"""The README's "Using it", run as written against a real server, so the documentation can't rot.

Extracted from README.md, not copied here: every ```bash block under "## Using it" and every
row of its error table whose "try it" cell is a command, **in the order the README gives
them, in one bash session** — so ``KEY=$(…)``, ``ID=$(…)`` and ``TOKEN=$(…)`` carry over as they
do for a reader who pastes them one after another. The only changes made to them: the reader's
placeholder ``ADMIN=kg_...`` gets the admin key, ``http://127.0.0.1:5000`` the server's URL,
``.venv/bin/python`` this interpreter; and ``curl`` is a shell function that records each
response (status, headers, body) on the way through.

What each must answer: a block followed by a ```json block must print that JSON (the example id
``Xk3v9QpL2mZa`` there stands for the id of the key the request sent, the example request id
for the one the server generated); every other curl under
"Using it" must succeed (2xx); a table row's last response must have its status and one of its
codes, and any header its note names ("with `Allow`"); earlier ones in the row, 2xx. Only rows
that need waiting (expiry) or an outage have no command to run.
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

from conftest import REQUIRE_SERVICES, ROOT, invoke_cli

README = ROOT / "README.md"
README_URL = "http://127.0.0.1:5000"
EXAMPLE_ID = "Xk3v9QpL2mZa"  # in printed JSON only: the id of the key the request sent
EXAMPLE_REQUEST_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # stands for any generated request id
PLACEHOLDER_ADMIN = re.compile(r"\bkg_\.\.\.")
#: Rows that can't be run by pasting a command: they need waiting, or a backing service down.
NOT_RUNNABLE = {"key_expired", "token_expired", "auth_throttled", "store_unavailable", "rate_limit_unavailable"}

pytestmark = pytest.mark.slow


# -- reading the README ------------------------------------------------------------------


def _curl_count(code: str) -> int:
    commands = re.sub(r"#[^\n]*", "", code)  # comments don't run
    return len(re.findall(r"(?:^|[\s;|&(])curl\s", commands))


@dataclass
class Block:
    """A ```bash block, and the ```json block right after it, if any (what it prints)."""

    code: str
    prints: Any = None
    line: int = 0

    @property
    def curl_count(self) -> int:
        return _curl_count(self.code)


@dataclass
class Row:
    """A row of the error table: its status, codes and, if runnable, its command."""

    status: int
    codes: set[str]
    code: str | None  # None: "a key created with --expires-in 90s, 90 s later" and the like
    line: int = 0
    headers: list[str] = field(default_factory=list)  # headers the note names ("with `Allow`")

    @property
    def curl_count(self) -> int:
        return _curl_count(self.code or "")


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
    """The rows of the ``| status | `code` | try it |`` table."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        status, codes, try_it = int(cells[0]), set(re.findall(r"`([a-z_]+)`", cells[1])), cells[2]
        m = re.fullmatch(r"`([^`]*\bcurl [^`]+)`(.*)", try_it)
        note = m.group(2) if m else ""
        rows.append(Row(status, codes, m.group(1) if m else None, n, re.findall(r"\bwith `([A-Za-z-]+)`", note)))
    return rows


def walk_through(text: str) -> list[Block | Row]:
    """Every bash block and table row, in the order a reader meets them."""
    return sorted([*bash_blocks(text), *error_rows(text)], key=lambda item: item.line)


def test_the_readme_has_examples_to_run() -> None:
    """The extraction finds what it should (a README rewrite that drops them fails here), every
    row that can be tried has a command, and no example depends on an id made up for the README."""
    using = section(README.read_text(), "Using it")
    blocks = bash_blocks(using)
    assert sum(b.curl_count for b in blocks) >= 12
    assert sum(b.prints is not None for b in blocks) >= 2
    rows = error_rows(using)
    assert {r.status for r in rows} >= {400, 401, 403, 404, 405, 429}
    runnable = set().union(*(r.codes for r in rows if r.code))
    assert runnable >= {"multiple_credentials", "invalid_request", "missing_credentials", "invalid_credentials",
                        "key_revoked", "invalid_token", "insufficient_scope", "ip_not_allowed", "not_found",
                        "method_not_allowed", "rate_limited"}
    assert set().union(*(r.codes for r in rows if not r.code)) <= NOT_RUNNABLE
    for block in blocks:
        assert EXAMPLE_ID not in block.code, f"README.md line {block.line}: a made-up id; use $ID"


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

    def adapt(self, code: str) -> str:
        return code.replace(README_URL, self.url).replace(".venv/bin/python", shlex.quote(sys.executable))

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        full = self.PRELUDE % {"log": shlex.quote(str(self.log))} + script
        return subprocess.run(["bash", "-c", full], env=self.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

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
    init = invoke_cli(env, "init", "--json")
    assert init.returncode == 0, init.stderr
    admin = json.loads(init.stdout)["admin_key"]["key"]
    return start_server(), admin


def _matches(expected: Any, actual: Any, key_id: str | None) -> bool:
    """Equal, where the example key id stands for the id of the key the request sent."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and expected.keys() == actual.keys() and all(
            _matches(v, actual[k], key_id) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(actual, list) and len(expected) == len(actual) and all(
            _matches(e, a, key_id) for e, a in zip(expected, actual))
    if expected == EXAMPLE_ID:
        return actual == key_id
    if expected == EXAMPLE_REQUEST_ID:
        return isinstance(actual, str) and re.fullmatch(r"[0-9a-f]{32}", actual) is not None
    return expected == actual


def _check_block(block: Block, ran: list[Response]) -> list[str]:
    where = f"README.md line {block.line}"
    if len(ran) != block.curl_count:
        return [f"{where}: {len(ran)} of {block.curl_count} curl commands ran"]
    failures = []
    for n, response in enumerate(ran):
        if block.prints is not None and n == len(ran) - 1:
            expected_status = block.prints.get("status", 200) if isinstance(block.prints, dict) else 200
            if response.status != expected_status:
                failures.append(f"{where}: {response}")
            elif not _matches(block.prints, response.json(), response.sent_key_id()):
                failures.append(f"{where}: printed {response.body!r}, the README shows {json.dumps(block.prints)}")
        elif not 200 <= response.status < 300:
            failures.append(f"{where}: {response}")
    return failures


def _check_row(row: Row, ran: list[Response]) -> list[str]:
    where = f"README.md line {row.line} ({row.status} {', '.join(sorted(row.codes))})"
    if len(ran) != row.curl_count or not ran:
        return [f"{where}: {len(ran)} of {row.curl_count} curl commands ran"]
    failures = [f"{where}: before the last, {r}" for r in ran[:-1] if not 200 <= r.status < 300]
    last = ran[-1]
    problem = last.json() if last.body else {}
    if last.status != row.status or problem.get("code") not in row.codes:
        failures.append(f"{where}: {last}")
    failures += [f"{where}: no {h} header" for h in row.headers if h.lower() not in last.headers]
    return failures


def test_using_it_runs_in_order_as_written(readme_server, env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    server, admin = readme_server
    items = walk_through(section(README.read_text(), "Using it"))
    runnable = [item for item in items if isinstance(item, Block) or item.code]
    bash = Bash(tmp_path / "curl", env, server.url)
    script = ""
    for i, item in enumerate(runnable):
        code = PLACEHOLDER_ADMIN.sub(admin, item.code) if isinstance(item, Block) else item.code
        script += f"\n__mark {i}\n# README.md line {item.line}\n{bash.adapt(code)}\n"
    script += f"\n__mark {len(runnable)}\necho \"$ID\" > \"$__log/ID\"\n"
    done = bash.run(script)
    assert done.returncode == 0, f"the examples failed:\n{done.stderr[-3000:]}\n{server.output()[-2000:]}"
    responses = bash.responses()

    failures: list[str] = []
    for i, item in enumerate(runnable):
        ran = responses[bash.mark(str(i)): bash.mark(str(i + 1))]
        failures += _check_block(item, ran) if isinstance(item, Block) else _check_row(item, ran)
    assert not failures, "\n".join(failures)
    assert sum(isinstance(item, Row) for item in runnable) >= 12

    # The examples did what they say: the key they managed by $ID was rotated, then revoked.
    key_id = (bash.log / "ID").read_text().strip()
    shown = json.loads(invoke_cli(env, "show-key", key_id, "--json").stdout)
    assert shown["state"] == "revoked" and shown["name"] == "billing"
    listed = json.loads(invoke_cli(env, "list-keys", "--json").stdout)
    assert [k["replaces"] for k in listed if k["name"] == "billing"].count(key_id) == 1
    # What the CLI printed on the way: the advice reads right with the key captured.
    assert "Store it now" not in done.stderr and "shown this once" in done.stderr
