"""``python manage.py …``: the command line as a user meets it.

Cases run in-process through click's ``CliRunner`` (fast, and able to pass values
a real argv cannot, such as NUL); a few end-to-end ones run real subprocesses (the
actual stdout/stderr a shell sees, a pipe that closes, a terminal). Every failure
must be one line on stderr naming the option as typed, a non-zero exit, no
traceback, and nothing written to the store.
"""

from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from api.cli import cli
from conftest import ROOT, free_port, run_cli
from keys import KeyRecord, KeyRevoked, generate_key, hash_key, issue_key, open_store, verify_key

KEY_RE = re.compile(r"kg_[0-9A-Za-z]{50}")
KEY_LINE_RE = re.compile(r"^(kg_[0-9A-Za-z]{50})$", re.M)
# What the contract promises in every metadata object (the code may add more).
METADATA_FIELDS = {"id", "name", "scopes", "state", "created_at", "expires_at", "revoked_at",
                   "last_used_at", "rate_limit", "allowed_ips"}
COMMANDS = ["init", "create-key", "list-keys", "show-key", "revoke-key", "rotate-key",
            "mint-token", "audit", "serve"]


def assert_clean_failure(returncode: int, stderr: str, *, names: str | None = None) -> None:
    """Non-zero exit; stderr is one ``error:`` line (click's usage errors too)."""
    assert returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), stderr
    if names is not None:
        assert names in stderr, stderr


def iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- in-process (CliRunner) -----------------------------------------------------------------


class Cli:
    """``CliRunner`` on a store of its own; ``count()`` reads the store directly."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None):  # noqa: ANN204
        result = self.runner.invoke(cli, list(args), input=input, prog_name="manage.py")
        # An escaped exception is a bug even if click turned it into exit code 1.
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{args} raised {result.exception!r}\n{result.stderr}"
        )
        return result

    def count(self) -> int:
        store = open_store(self.url)
        try:
            return store.count()
        finally:
            store.close()

    def ok(self, *args: str, input: str | None = None):  # noqa: ANN201
        result = self(*args, input=input)
        assert result.exit_code == 0, result.stderr
        return result

    def create(self, *args: str) -> dict:
        return json.loads(self.ok("create-key", *args, "--json").stdout)


@pytest.fixture
def kg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cli:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("KEYGATE_DATABASE_URL", url)
    return Cli(url)


@pytest.fixture
def ready(kg: Cli) -> Cli:
    kg.ok("init", "--no-admin-key")
    return kg


def test_init_prints_one_admin_key_on_stdout_then_none(kg: Cli) -> None:
    first = kg.ok("init")
    lines = first.stdout.splitlines()
    assert len(lines) == 1 and KEY_RE.fullmatch(lines[0]), first.stdout
    assert "admin" in first.stderr
    store = open_store(kg.url)
    assert verify_key(store, lines[0]).scopes == ("admin",)
    store.close()

    again = kg.ok("init")
    assert again.stdout == ""
    assert kg.count() == 1


def test_init_json(kg: Cli) -> None:
    out = json.loads(kg.ok("init", "--json").stdout)
    assert isinstance(out["schema_version"], int) and out["schema_version"] >= 1
    admin = out["admin_key"]
    assert METADATA_FIELDS <= admin.keys() and "key_hash" not in admin
    assert admin["scopes"] == ["admin"] and KEY_RE.fullmatch(admin["key"])

    again = json.loads(kg.ok("init", "--json").stdout)
    assert again == {"schema_version": out["schema_version"], "admin_key": None}


def test_init_no_admin_key_then_plain_init_creates_one(kg: Cli) -> None:
    result = kg.ok("init", "--no-admin-key")
    assert result.stdout == "" and kg.count() == 0
    # The store still has no key at all, so a plain init offers the admin key now.
    assert KEY_RE.fullmatch(kg.ok("init").stdout.strip())
    assert kg.count() == 1


def test_create_key_with_every_option_json(ready: Cli) -> None:
    out = ready.create("--name", "billing service", "--scope", "secret:read", "--scope", "data:read",
                       "--expires-in", "30d", "--rate-limit", "10/second",
                       "--allow-ip", "10.0.0.0/8", "--allow-ip", "2001:db8::/32")
    assert METADATA_FIELDS | {"key"} <= out.keys()
    assert "key_hash" not in out
    assert out["name"] == "billing service"
    assert set(out["scopes"]) == {"secret:read", "data:read"}
    assert out["rate_limit"] == "10/second"
    assert out["allowed_ips"] == ["10.0.0.0/8", "2001:db8::/32"]
    assert out["revoked_at"] is None and out["last_used_at"] is None
    assert (iso(out["expires_at"]) - iso(out["created_at"])).total_seconds() == 30 * 86400
    assert out["created_at"].endswith("Z")

    store = open_store(ready.url)
    record = verify_key(store, out["key"])
    store.close()
    assert record.id == out["id"] and record.allowed_ips == ("10.0.0.0/8", "2001:db8::/32")
    assert ready.count() == 1


def test_create_key_plain_prints_only_the_key_on_stdout(ready: Cli) -> None:
    result = ready.ok("create-key", "--name", "n", "--scope", "admin")
    key = result.stdout.strip()
    assert result.stdout == key + "\n" and KEY_RE.fullmatch(key)
    assert key not in result.stderr  # the id and advice go to stderr, the secret only to stdout
    assert key[3:15] in result.stderr  # the id


def test_list_and_show_never_reveal_a_secret(ready: Cli) -> None:
    made = [ready.create("--name", f"k{i}", "--scope", "data:read") for i in range(3)]
    secrets_ = [m["key"] for m in made] + [hash_key(m["key"]) for m in made]

    listed_json = ready.ok("list-keys", "--json").stdout
    listed = json.loads(listed_json)
    assert isinstance(listed, list)
    assert sorted(m["id"] for m in listed) == sorted(m["id"] for m in made)
    for m in listed:
        assert METADATA_FIELDS <= m.keys() and "key" not in m and "key_hash" not in m
    table = ready.ok("list-keys").stdout
    for m in made:
        assert m["id"] in table

    shown_json = json.loads(ready.ok("show-key", made[0]["id"], "--json").stdout)
    assert shown_json == {k: v for k, v in made[0].items() if k != "key"}
    shown = ready.ok("show-key", made[0]["id"]).stdout
    assert made[0]["id"] in shown and "k0" in shown

    for text in (listed_json, table, json.dumps(shown_json), shown):
        for s in secrets_:
            assert s not in text
        assert "key_hash" not in text


def test_list_keys_json_on_an_empty_store(ready: Cli) -> None:
    assert json.loads(ready.ok("list-keys", "--json").stdout) == []


def test_revoke_by_id_twice_is_harmless(ready: Cli) -> None:
    made = ready.create("--name", "n", "--scope", "secret:read")
    first = ready.ok("revoke-key", made["id"])
    assert made["id"] in first.stdout
    revoked_at = json.loads(ready.ok("show-key", made["id"], "--json").stdout)["revoked_at"]
    assert revoked_at is not None
    ready.ok("revoke-key", made["id"])
    assert json.loads(ready.ok("show-key", made["id"], "--json").stdout)["revoked_at"] == revoked_at
    store = open_store(ready.url)
    with pytest.raises(KeyRevoked):
        verify_key(store, made["key"])
    store.close()


@pytest.mark.parametrize("via_stdin", [False, True], ids=["argument", "stdin"])
def test_revoke_by_plaintext(ready: Cli, via_stdin: bool) -> None:
    keep = ready.create("--name", "keep", "--scope", "secret:read")
    leaked = ready.create("--name", "leaked", "--scope", "secret:read")
    if via_stdin:
        ready.ok("revoke-key", "--key", "-", input=leaked["key"] + "\n")
    else:
        ready.ok("revoke-key", "--key", leaked["key"])
    listed = {m["id"]: m for m in json.loads(ready.ok("list-keys", "--json").stdout)}
    assert listed[leaked["id"]]["revoked_at"] is not None
    assert listed[keep["id"]]["revoked_at"] is None
    # A revoked key can still be found (and re-revoked) by its value.
    ready.ok("revoke-key", "--key", leaked["key"])


@pytest.mark.parametrize("args", [
    ["list-keys"], ["list-keys", "--json"],
    ["create-key", "--name", "n", "--scope", "admin"],
    ["show-key", "AAAAAAAAAAAA"], ["revoke-key", "AAAAAAAAAAAA"],
    ["rotate-key", "AAAAAAAAAAAA"], ["mint-token", "AAAAAAAAAAAA"],
], ids=lambda a: " ".join(a))
def test_every_command_before_init_says_so_in_one_line(kg: Cli, args: list[str]) -> None:
    result = kg(*args)
    assert_clean_failure(result.exit_code, result.stderr, names="init")
    assert result.stdout == ""


def _key_like() -> str:
    """Well-formed, valid checksum, but not in any store."""
    return generate_key().plaintext


def _bad_inputs() -> list:
    create = ["create-key", "--name", "n", "--scope", "secret:read"]
    cases = {
        # durations
        "expires 0s": create + ["--expires-in", "0s"],
        "expires 1w": create + ["--expires-in", "1w"],
        "expires -5m": create + ["--expires-in", "-5m"],
        "expires abc": create + ["--expires-in", "abc"],
        "expires empty": create + ["--expires-in", ""],
        # scopes
        "scope superuser": ["create-key", "--name", "n", "--scope", "superuser"],
        "scope empty": ["create-key", "--name", "n", "--scope", ""],
        "no scope": ["create-key", "--name", "n"],
        # CIDRs
        "cidr host bits": create + ["--allow-ip", "10.0.0.1/8"],
        "cidr 300": create + ["--allow-ip", "300.1.1.1"],
        "cidr v6 /129": create + ["--allow-ip", "::1/129"],
        "cidr junk": create + ["--allow-ip", "not-a-network"],
        "cidr empty": create + ["--allow-ip", ""],
        "cidr second bad": create + ["--allow-ip", "10.0.0.0/8", "--allow-ip", "10.0.0.0/33"],
        # rate limits
        "rate 5/week": create + ["--rate-limit", "5/week"],
        "rate 0/minute": create + ["--rate-limit", "0/minute"],
        "rate abc": create + ["--rate-limit", "abc"],
        # names
        "name empty": ["create-key", "--name", "", "--scope", "admin"],
        "name blank": ["create-key", "--name", "   ", "--scope", "admin"],
        "name 500": ["create-key", "--name", "x" * 500, "--scope", "admin"],
        "name NUL": ["create-key", "--name", "a\x00b", "--scope", "admin"],
        "name newline": ["create-key", "--name", "a\nb", "--scope", "admin"],
        # issue 12: a zone id made one checked entry of two, the second "anywhere"
        "allow-ip zone id": create + ["--allow-ip", "::%x 0.0.0.0/0"],
        "allow-ip zone id alone": create + ["--allow-ip", "fe80::1%eth0"],
        "allow-ip with spaces": create + ["--allow-ip", " 10.0.0.0/8"],
        "no name": ["create-key", "--scope", "admin"],
        # unknown ids and malformed --key
        "show unknown id": ["show-key", "AAAAAAAAAAAA"],
        "show malformed id": ["show-key", "../../etc"],
        "revoke unknown id": ["revoke-key", "AAAAAAAAAAAA"],
        "rotate unknown id": ["rotate-key", "AAAAAAAAAAAA"],
        "mint unknown id": ["mint-token", "AAAAAAAAAAAA"],
        "revoke --key junk": ["revoke-key", "--key", "kg_junk"],
        "revoke --key not a key": ["revoke-key", "--key", "hello world"],
        "revoke --key empty": ["revoke-key", "--key", ""],
        "revoke --key unknown": ["revoke-key", "--key", _key_like()],
        "revoke --key mistyped": ["revoke-key", "--key", _key_like()[:-1] + "!"],
        "revoke neither": ["revoke-key"],
        "revoke both": ["revoke-key", "AAAAAAAAAAAA", "--key", _key_like()],
        "unknown option": create + ["--colour", "red"],
        "unknown command": ["make-key"],
    }
    return [pytest.param(v, id=k) for k, v in cases.items()]


@pytest.mark.parametrize("args", _bad_inputs())
def test_bad_input_is_refused_in_one_line(ready: Cli, args: list[str]) -> None:
    ready.create("--name", "existing", "--scope", "admin")
    result = ready(*args)
    assert_clean_failure(result.exit_code, result.stderr)
    assert not KEY_RE.search(result.stdout)
    assert ready.count() == 1


def test_bad_input_names_the_problem(ready: Cli) -> None:
    def stderr(*args: str) -> str:
        result = ready(*args)
        assert result.exit_code != 0
        return result.stderr

    create = ["create-key", "--name", "n", "--scope", "admin"]
    assert "1w" in stderr(*create, "--expires-in", "1w")
    assert "10.0.0.1/8" in stderr(*create, "--allow-ip", "10.0.0.1/8")
    assert "5/week" in stderr(*create, "--rate-limit", "5/week")
    assert "superuser" in stderr("create-key", "--name", "n", "--scope", "superuser")
    assert "AAAAAAAAAAAA" in stderr("show-key", "AAAAAAAAAAAA")
    assert ready.count() == 0


def test_revoke_key_from_empty_stdin_is_refused(ready: Cli) -> None:
    result = ready("revoke-key", "--key", "-", input="")
    assert_clean_failure(result.exit_code, result.stderr)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(kg: Cli, command: str) -> None:
    result = kg.ok(command, "--help")
    assert result.stdout.startswith("Usage:") and command in result.stdout
    expected = {
        "init": ["--json", "--no-admin-key"],
        "create-key": ["--name", "--scope", "--expires-in", "--rate-limit", "--allow-ip", "--json"],
        "list-keys": ["--json"],
        "show-key": ["--json"],
        "revoke-key": ["--key"],
        "rotate-key": ["--grace", "--json"],
        "mint-token": ["--scope", "--ttl", "--json"],
        "audit": ["--key", "--limit", "--json"],
        "serve": ["--host", "--port", "--workers"],
    }[command]
    for option in expected:
        assert option in result.stdout
    assert not Path(kg.url.removeprefix("sqlite:///")).exists()  # --help touches nothing


def test_top_level_help_lists_every_command(kg: Cli) -> None:
    out = kg.ok("--help").stdout
    for command in COMMANDS:
        assert command in out
    assert "--version" in out


def test_version_is_the_package_version(kg: Cli) -> None:
    from importlib import metadata

    assert kg.ok("--version").stdout == f"keygate {metadata.version('keygate')}\n"


# -- the newcomer's walk-through (issue 13) ----------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    # click's own usage errors: one line, with where to look, not the four-line usage block
    (["create-key", "--scope", "admin"], "error: Missing option '--name' (see 'manage.py create-key --help')"),
    (["create-key", "--name", "n", "--scope", "admin", "--colour", "red"], "No such option '--colour'"),
    (["make-key"], "No such command 'make-key'"),
    # the option named once, as typed — not "Invalid value for '--expires-in': --expires-in: …"
    (["create-key", "--name", "n", "--scope", "admin", "--expires-in", "5x"],
     "error: --expires-in: '5x' is not a duration: seconds (300) or 90s, 15m, 12h, 30d"),
    (["rotate-key", "AAAAAAAAAAAA", "--grace", "soon"], "error: --grace: 'soon' is not a duration"),
    # the API's field names (rate_limit, allowed_ips, name) become the options' names
    (["create-key", "--name", "n", "--scope", "admin", "--rate-limit", "5/week"],
     "error: --rate-limit: '5/week' is not a rate limit like 100/minute"),
    (["create-key", "--name", "n", "--scope", "admin", "--allow-ip", "junk"], "error: --allow-ip: 'junk'"),
    (["create-key", "--name", " ", "--scope", "admin"], "error: --name must not be empty"),
    # host bits: what to type instead
    (["create-key", "--name", "n", "--scope", "admin", "--allow-ip", "10.0.0.1/8"],
     "error: --allow-ip: '10.0.0.1/8' has host bits set: write the block as 10.0.0.0/8 or the one "
     "address as 10.0.0.1"),
])
def test_every_error_is_one_line_naming_the_option_as_typed(ready: Cli, args: list[str], says: str) -> None:
    result = ready(*args)
    assert_clean_failure(result.exit_code, result.stderr)
    assert says in result.stderr, result.stderr
    assert "Invalid value for" not in result.stderr and "rate_limit" not in result.stderr
    assert "allowed_ips" not in result.stderr and result.stdout == ""
    assert ready.count() == 0


@pytest.mark.parametrize(("option", "value", "seconds"), [
    ("--expires-in", "300", 300), ("--expires-in", "5m", 300), ("--expires-in", "90", 90),
])
def test_durations_are_plain_seconds_or_a_unit(ready: Cli, option: str, value: str, seconds: int) -> None:
    made = ready.create("--name", "n", "--scope", "admin", option, value)
    assert (iso(made["expires_at"]) - iso(made["created_at"])).total_seconds() == seconds
    rotated = json.loads(ready.ok("rotate-key", made["id"], "--grace", value, "--json").stdout)
    assert rotated["replaces"] == made["id"]
    token = json.loads(ready.ok("mint-token", rotated["id"], "--ttl", value, "--json").stdout)
    assert (iso(token["expires_at"]) - datetime.now(iso(made["created_at"]).tzinfo)).total_seconds() <= seconds


def test_a_key_pasted_where_an_id_belongs_is_recognised_and_never_echoed(ready: Cli) -> None:
    made = ready.create("--name", "n", "--scope", "secret:read")
    secret = made["key"][15:]
    for args in (["show-key", made["key"]], ["rotate-key", made["key"]], ["mint-token", made["key"]],
                 ["revoke-key", made["key"]], ["audit", "--key", made["key"]], ["show-key", f" {made['key']} "]):
        result = ready(*args)
        assert_clean_failure(result.exit_code, result.stderr, names="that is an API key, not a key id")
        assert f"its id is {made['id']}" in result.stderr
        assert not any(secret[i:i + 6] in result.stderr for i in range(len(secret) - 5)), result.stderr
    assert "--key -" in ready("revoke-key", made["key"]).stderr  # how to revoke by value instead
    # Anything else that isn't an id is not repeated either (it may be a secret of some other kind).
    result = ready("show-key", "x" * 30 + "SECRETPART")
    assert_clean_failure(result.exit_code, result.stderr, names="not a key id")
    assert "SECRETPART" not in result.stderr
    assert json.loads(ready.ok("show-key", made["id"], "--json").stdout)["state"] == "active"


def test_state_and_the_limit_in_force_everywhere(ready: Cli) -> None:
    """active, grace (rotated with a grace period), revoked, expired — in show-key, list-keys and
    their JSON; the rate limit in force, the default included."""
    old = ready.create("--name", "old", "--scope", "secret:read")
    assert old["state"] == "active" and old["rate_limit"] == "600/minute"
    new = json.loads(ready.ok("rotate-key", old["id"], "--grace", "1h", "--json").stdout)
    gone = ready.create("--name", "gone", "--scope", "secret:read", "--rate-limit", "5/second")
    ready.ok("revoke-key", gone["id"])
    store = open_store(ready.url)
    issue_key(store, name="brief", scopes=["secret:read"], expires_in=1, now=time.time() - 10)
    store.close()

    states = {m["name"] + ("" if m["replaces"] is None else "+"): m["state"]
              for m in json.loads(ready.ok("list-keys", "--json").stdout)}
    assert states == {"old": "grace", "old+": "active", "gone": "revoked", "brief": "expired"}
    shown = ready.ok("show-key", old["id"]).stdout
    assert re.search(r"^ *state: grace$", shown, flags=re.M), shown
    assert re.search(r"^ *rate_limit: 600/minute \(the default\)$", shown, flags=re.M), shown
    assert "revoked_at" in shown and new["id"] not in shown
    assert re.search(r"^ *rate_limit: 5/second$", ready.ok("show-key", gone["id"]).stdout, flags=re.M)
    assert json.loads(ready.ok("show-key", gone["id"], "--json").stdout)["state"] == "revoked"


def test_list_keys_is_a_table_oldest_first_with_created_and_last_used(ready: Cli) -> None:
    store = open_store(ready.url)
    now = time.time()
    # Ids in the opposite order of creation: the table sorts by time, not by id.
    for key_id, name, age in (("AAAAAAAAAAA1", "newest", 10), ("ZZZZZZZZZZZ1", "oldest", 3000),
                              ("MMMMMMMMMMM1", "middle", 600)):
        store.add(KeyRecord(id=key_id, name=name, key_hash=hash_key(generate_key(key_id).plaintext),
                            scopes=("secret:read",), created_at=now - age,
                            last_used_at=now - 5 if name == "middle" else None))
    store.close()
    header, *rows = ready.ok("list-keys").stdout.splitlines()
    assert header.split() == ["ID", "NAME", "SCOPES", "STATE", "CREATED", "(UTC)", "LAST", "USED", "EXPIRES"]
    assert [row.split()[1] for row in rows] == ["oldest", "middle", "newest"]

    def column(row: str, title: str) -> str:
        return row[header.index(title):].split("  ")[0]

    def minute(ts: float) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")

    assert [column(row, "CREATED") for row in rows] == [minute(now - 3000), minute(now - 600), minute(now - 10)]
    assert [column(row, "LAST USED") for row in rows] == ["-", minute(now - 5), "-"]
    assert [column(row, "STATE") for row in rows] == ["active"] * 3


BAD_CONFIG = [
    ("KEYGATE_DATABASE_URL", "mysql://x"),
    ("KEYGATE_DATABASE_URL", "not a url"),
    ("KEYGATE_SECRET_KEY", "short"),
    ("KEYGATE_RATELIMIT_STORAGE_URL", "ftp://x"),
    ("KEYGATE_DEFAULT_RATE_LIMIT", "lots"),
    ("KEYGATE_TOKEN_MAX_TTL", "forever"),
    ("KEYGATE_SECRET_KEY", "changeme-changeme-changeme-changeme"),  # issue 12: long but weak
    ("KEYGATE_SECRET_KEY", "a" * 36),
    ("KEYGATE_AUDIT_RETENTION", "forever"),
    ("KEYGATE_CORS_ORIGINS", "*"),
]


@pytest.mark.parametrize("var,value", BAD_CONFIG, ids=[f"{k}={v}" for k, v in BAD_CONFIG])
@pytest.mark.parametrize("command", [["init"], ["list-keys"], ["create-key", "--name", "n", "--scope", "admin"],
                                     ["serve", "--port", "1"]], ids=lambda c: c[0])
def test_bad_configuration_in_process(ready: Cli, monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                      command: list[str]) -> None:
    monkeypatch.setenv(var, value)
    result = ready(*command)
    assert_clean_failure(result.exit_code, result.stderr, names=var)
    monkeypatch.delenv(var)
    assert ready.count() == 0


def test_the_advice_above_a_new_key_reads_right_captured_or_on_a_terminal(
        ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """``KEY=$(manage.py create-key …)`` must not leave "Store it now…:" introducing nothing."""
    captured = ready.ok("create-key", "--name", "n", "--scope", "admin")
    assert "Store it now" not in captured.stderr and not captured.stderr.rstrip().endswith(":")
    assert "standard output" in captured.stderr and "shown this once" in captured.stderr
    monkeypatch.setattr("api.cli._stdout_is_a_terminal", lambda: True)
    for args in (["create-key", "--name", "t", "--scope", "admin"], ["rotate-key", captured.stdout[3:15]]):
        on_terminal = ready.ok(*args)
        assert on_terminal.stderr.rstrip().endswith("Store it now; it will not be shown again:"), args
        assert KEY_RE.fullmatch(on_terminal.stdout.strip())


def test_a_reader_that_goes_away_ends_the_output_quietly(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """``list-keys | head -1``: no "error: unexpected BrokenPipeError", the exit status of a tool
    stopped by SIGPIPE. (End to end, through a real pipe: test_subprocess_pipe_closed_early.)"""
    for i in range(3):
        ready.create("--name", f"k{i}", "--scope", "admin")
    import click

    real_echo, lines = click.echo, []

    def echo(message=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if not kwargs.get("err") and lines:
            raise BrokenPipeError(32, "Broken pipe")
        lines.append(message)
        return real_echo(message, *args, **kwargs)

    monkeypatch.setattr(click, "echo", echo)
    for args in (["list-keys"], ["list-keys", "--json"]):
        lines.clear()
        result = ready(*args)
        assert result.exit_code == 141 and result.stderr == "", result.stderr


# -- real subprocesses -------------------------------------------------------------------------


@pytest.mark.slow
def test_subprocess_pipe_closed_early(env: dict[str, str]) -> None:
    """``list-keys | head -1`` with a real pipe whose reader has already gone (so the first
    write meets it, whatever the timing): nothing on stderr, status 141."""
    assert run_cli(env, "init").returncode == 0
    for args in (["list-keys"], ["list-keys", "--json"]):
        proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader goes away before anything is written
        err = proc.stderr.read()
        assert proc.wait(60) == 141 and err == "", (args, err)


@pytest.mark.slow
def test_subprocess_on_a_terminal_the_advice_introduces_the_key(env: dict[str, str]) -> None:
    """With stdout a terminal (a pty), the key follows "Store it now; …:"; captured, it doesn't say so."""
    import os
    import pty

    assert run_cli(env, "init", "--no-admin-key").returncode == 0
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "create-key", "--name", "tty",
                             "--scope", "admin"], env=env, cwd=ROOT, stdout=terminal, stderr=subprocess.PIPE,
                            text=True)
    os.close(terminal)
    _out, err = proc.communicate(timeout=60)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal's other end has closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.returncode == 0, err
    assert err.rstrip().endswith("Store it now; it will not be shown again:"), err
    assert KEY_RE.fullmatch(shown.decode().strip())
    captured = run_cli(env, "create-key", "--name", "pipe", "--scope", "admin")
    assert "Store it now" not in captured.stderr and KEY_RE.fullmatch(captured.stdout.strip())


@pytest.mark.slow
def test_subprocess_lifecycle(env: dict[str, str]) -> None:
    """The real entry point, stdout and stderr as a shell sees them (the cases themselves are
    covered in-process above)."""
    first = run_cli(env, "init")
    assert first.returncode == 0, first.stderr
    admin = first.stdout.strip()
    assert first.stdout == admin + "\n" and KEY_RE.fullmatch(admin)

    made = run_cli(env, "create-key", "--name", "svc", "--scope", "secret:read", "--scope", "data:read",
                   "--expires-in", "12h", "--rate-limit", "100/minute", "--allow-ip", "127.0.0.0/8",
                   "--json")
    assert made.returncode == 0, made.stderr
    meta = json.loads(made.stdout)
    assert METADATA_FIELDS | {"key"} <= meta.keys() and "key_hash" not in meta

    listed = run_cli(env, "list-keys", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(m["id"] for m in json.loads(listed.stdout)) == sorted([admin[3:15], meta["id"]])
    for secret in (admin, meta["key"], hash_key(admin), hash_key(meta["key"])):
        assert secret not in listed.stdout + listed.stderr

    revoked = run_cli(env, "revoke-key", "--key", "-", input=meta["key"] + "\n")
    assert revoked.returncode == 0, revoked.stderr
    assert meta["key"] not in revoked.stdout + revoked.stderr
    after = json.loads(run_cli(env, "show-key", meta["id"], "--json").stdout)
    assert after["revoked_at"] is not None and after["state"] == "revoked"
    usage = run_cli(env, "create-key", "--scope", "admin")  # click's usage error, on a real stderr
    assert_clean_failure(usage.returncode, usage.stderr, names="--name")


@pytest.mark.slow
def test_subprocess_before_init(env: dict[str, str]) -> None:
    for args in (["list-keys"], ["create-key", "--name", "n", "--scope", "admin"],
                 ["serve", "--port", str(free_port())]):
        result = run_cli(env, *args, timeout=30)
        assert_clean_failure(result.returncode, result.stderr, names="init")
        assert result.stdout == ""


@pytest.mark.slow
def test_subprocess_bad_input(env: dict[str, str]) -> None:
    """A case of each kind, on a real stderr: click's own check, an option's parser, a field the
    key API refuses, the store's answer (every case runs in-process above)."""
    assert run_cli(env, "init", "--no-admin-key").returncode == 0
    create = ["create-key", "--name", "n", "--scope", "secret:read"]
    cases = [
        ["create-key", "--name", "n", "--scope", "superuser"],
        create + ["--expires-in", "1w"],
        create + ["--allow-ip", "::1/129"],
        ["revoke-key", "--key", _key_like()],
    ]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: run_cli(env, *a), cases))
    for args, result in zip(cases, results):
        assert_clean_failure(result.returncode, result.stderr)
        assert result.stdout == "", args
    listed = run_cli(env, "list-keys", "--json")
    assert json.loads(listed.stdout) == []


@pytest.mark.slow
def test_subprocess_bad_configuration(env: dict[str, str]) -> None:
    """``serve`` in a real process: one line naming the variable, before any port is bound (each
    variable is tried with each command in-process above)."""
    assert run_cli(env, "init", "--no-admin-key").returncode == 0
    cases = [(var, {**env, var: value}, ["serve", "--port", str(free_port())])
             for var, value in (BAD_CONFIG[2], BAD_CONFIG[3])]
    # An unreachable database: a driver error that spans several lines must still be one.
    cases.append(("KEYGATE_DATABASE_URL",
                  {**env, "KEYGATE_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/x"},
                  ["list-keys"]))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: run_cli(c[1], *c[2], timeout=30), cases))
    for (var, _env, command), result in zip(cases, results):
        assert_clean_failure(result.returncode, result.stderr, names=var if "postgresql" not in
                             _env["KEYGATE_DATABASE_URL"] else None)
        assert result.stdout == "", command
        assert "serving" not in result.stderr


# -- crash safety and concurrency -------------------------------------------------------------


def _db_path(env: dict[str, str]) -> str:
    return env["KEYGATE_DATABASE_URL"].removeprefix("sqlite:///")


def _spawn_create(env: dict[str, str], i: int, as_json: bool) -> subprocess.Popen[str]:
    args = [sys.executable, str(ROOT / "manage.py"), "create-key", "--name", f"crash {i}",
            "--scope", "secret:read", "--expires-in", "1d"]
    return subprocess.Popen(args + (["--json"] if as_json else []), env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _printed_keys(stdout: str, as_json: bool) -> list[str]:
    if as_json:
        return re.findall(r'"key": "(kg_[0-9A-Za-z]{50})"', stdout)
    return KEY_LINE_RE.findall(stdout)  # whole lines only: a torn line was never "shown"


def _assert_store_sound(env: dict[str, str], shown: list[str]) -> list[dict]:
    listed = run_cli(env, "list-keys", "--json")
    assert listed.returncode == 0, listed.stderr
    metadata = json.loads(listed.stdout)
    with sqlite3.connect(_db_path(env)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = open_store(env["KEYGATE_DATABASE_URL"])
    try:
        for key in shown:
            assert verify_key(store, key).id == key[3:15], "a key that was shown must work"
    finally:
        store.close()
    return metadata


@pytest.mark.slow
def test_killed_create_key_never_loses_a_shown_key(env: dict[str, str]) -> None:
    assert run_cli(env, "init", "--no-admin-key").returncode == 0
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    shown: list[str] = []
    killed = 0
    for wave in range(5):  # 5 waves of 4 concurrent writers, each SIGKILLed at a random moment
        procs = [(_spawn_create(env, wave * 4 + j, as_json=bool(j % 2)), bool(j % 2)) for j in range(4)]
        start = time.monotonic()
        for (proc, as_json), delay in sorted(zip(procs, (rng.uniform(0.05, 1.2) for _ in procs)),
                                             key=lambda p: p[1]):
            time.sleep(max(0.0, start + delay - time.monotonic()))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                killed += 1
        for proc, as_json in procs:
            out, _err = proc.communicate(timeout=30)
            shown += _printed_keys(out, as_json)
    print(f"seed={seed} killed={killed} shown={len(shown)}")

    metadata = _assert_store_sound(env, shown)
    assert {k[3:15] for k in shown} <= {m["id"] for m in metadata}
    # The store is still writable: no lock or journal was left behind.
    after = run_cli(env, "create-key", "--name", "after", "--scope", "admin")
    assert after.returncode == 0, after.stderr
    _assert_store_sound(env, shown + [after.stdout.strip()])


@pytest.mark.slow
def test_concurrent_create_key_all_succeed(env: dict[str, str]) -> None:
    assert run_cli(env, "init", "--no-admin-key").returncode == 0
    procs = [_spawn_create(env, i, as_json=True) for i in range(10)]
    outputs = [(p.communicate(timeout=60), p.returncode) for p in procs]
    for (_out, err), rc in outputs:
        assert rc == 0, err
    keys = [json.loads(out)["key"] for (out, _err), _rc in outputs]
    assert len(set(keys)) == 10
    metadata = _assert_store_sound(env, keys)
    assert len(metadata) == 10



def test_init_says_how_to_make_a_good_secret(kg: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYGATE_SECRET_KEY")
    monkeypatch.setenv("KEYGATE_INSTANCE_PATH", str(Path(kg.url.removeprefix("sqlite:///")).parent / "inst"))
    result = kg.ok("init", "--no-admin-key")
    assert "KEYGATE_SECRET_KEY=$(python -c 'import secrets; print(secrets.token_hex(32))')" in result.stderr
    monkeypatch.setenv("KEYGATE_SECRET_KEY", "test-secret-test-secret-test-secret")
    weak = kg("init")
    assert_clean_failure(weak.exit_code, weak.stderr, names="KEYGATE_SECRET_KEY")
    assert "secrets.token_hex(32)" in weak.stderr and "test-secret" not in weak.stderr


def test_a_store_outage_tells_the_operator_its_cause(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API client gets a generic 503; the person at the CLI gets the cause, in one line."""
    monkeypatch.setenv("KEYGATE_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    result = ready("list-keys")
    assert_clean_failure(result.exit_code, result.stderr, names="refused")


def test_init_makes_a_private_instance_whatever_the_umask(env: dict[str, str], tmp_path: Path) -> None:
    """Issue 12: with KEYGATE_SECRET_KEY set (no secret file written), `init` left instance/
    0755 and keygate.db 0644; every path now creates them 0700 and 0600."""
    import stat

    instance = Path(env["KEYGATE_INSTANCE_PATH"])
    done = subprocess.run([sys.executable, str(ROOT / "manage.py"), "init", "--no-admin-key"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, umask=0)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    for path in instance.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
