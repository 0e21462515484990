"""``manage.py export`` / ``import``: keys (metadata and hashes) as JSON lines, from any store
into an empty store of any backend; the old keys verify there."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from api.scopes import SCOPES
from conftest import BACKENDS, assert_no_credentials, assert_one_line_failure, make_database_url, run_cli
from keys import issue_key, open_store, revoke_key, verify_key
from keys.backup import export_lines, import_export
from keys.exc import InvalidRequest, KeyRevoked
from keys.issuing import rotate_key
from keys.tokens import TokenSigner, mint_token


def _fill(store) -> dict[str, str]:  # noqa: ANN001
    """A store with keys in every state, usage, an audit trail; name -> plaintext."""
    now = time.time()
    keys = {
        "plain": issue_key(store, name="plain", scopes=["secret:read"]),
        "rich": issue_key(store, name="rich ünïcode", scopes=["data:read", "metrics:read"], expires_in=86400,
                          rate_limit="100/minute", allowed_ips=["10.0.0.0/8", "2001:db8::/32"]),
        "revoked": issue_key(store, name="revoked", scopes=["admin"]),
        "old": issue_key(store, name="old", scopes=["data:read"]),
    }
    revoke_key(store, keys["revoked"].record.id)
    keys["new"] = rotate_key(store, keys["old"].record.id, grace=3600)
    store.record_usage({keys["plain"].record.id: (now, 41)})
    store.add_auth_failures({"invalid_credentials": 3})
    return {name: issued.plaintext for name, issued in keys.items()}


@pytest.mark.parametrize("target", BACKENDS)
def test_an_export_from_sqlite_loads_into_every_backend_and_the_keys_verify_there(
        target: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source = open_store(make_database_url("sqlite", tmp_path, request))
    source.migrate()
    plaintexts = _fill(source)
    dump = tmp_path / "keys.jsonl"
    dump.write_text("\n".join(export_lines(source, audit=True)) + "\n")
    assert_no_credentials(dump.read_text(), "the export")

    (tmp_path / "t").mkdir()
    dest = open_store(make_database_url(target, tmp_path / "t", request))
    dest.migrate()
    assert import_export(dest, dump) == (5, len(source.events(limit=1000)))
    for name in ("plain", "rich", "new", "old"):  # "old" is in its grace period
        assert verify_key(dest, plaintexts[name]) == verify_key(source, plaintexts[name])
    with pytest.raises(KeyRevoked):
        verify_key(dest, plaintexts["revoked"])
    assert [r for r in dest.list_keys()] == [r for r in source.list_keys()]  # every field, to the microsecond
    assert [(e.event, e.key_id, e.actor, e.at, e.detail) for e in dest.events(limit=1000)] == \
        [(e.event, e.key_id, e.actor, e.at, e.detail) for e in source.events(limit=1000)]
    assert dest.auth_failures() == {"invalid_credentials": 3}
    # Tokens minted before the move still verify (the generation came along).
    signer = TokenSigner(("s" * 40,), 3600)
    record = source.get(plaintexts["plain"][3:15])
    token = mint_token(source, signer, record, actor="test").token
    assert signer.verify(dest, token).key_id == record.id
    source.close()
    dest.close()


def test_import_refuses_a_store_that_holds_keys_and_changes_nothing(store, tmp_path: Path) -> None:  # noqa: ANN001
    issue_key(store, name="already here", scopes=["admin"])
    dump = tmp_path / "keys.jsonl"
    dump.write_text("\n".join(export_lines(store)) + "\n")
    before = store.list_keys()
    with pytest.raises(InvalidRequest, match="already holds 1 key"):
        import_export(store, dump)
    assert store.list_keys() == before


BAD_LINES = [
    ("", "empty"),
    ("not json\n", "line 1: not a JSON object"),
    ('{"format": "something else", "version": 1}\n', "not a keygate export"),
    ('{"format": "keygate-export", "version": 2}\n', "version"),
    ("HEADER\n[1, 2]\n", "line 2: not a JSON object"),
    ('HEADER\n{"type": "password"}\n', "unknown line type"),
    ("HEADER\nKEY(key_hash='kg_secret')\n", "key_hash"),
    ("HEADER\nKEY(id='../../etc')\n", "id is not a key id"),
    ("HEADER\nKEY(scopes=['root'])\n", "unknown scope"),
    ("HEADER\nKEY(created_at='yesterday')\n", "created_at"),
    ("HEADER\nKEY(created_at=float('nan'))\n", "created_at"),
    ("HEADER\nKEY(use_count=-1)\n", "use_count"),
    ("HEADER\nKEY(rate_limit='lots')\n", "rate"),
    ("HEADER\nKEY(allowed_ips=['10.0.0.0/33'])\n", "10.0.0.0/33"),
    ("HEADER\nKEY(extra=1)\n", "unknown field 'extra'"),
    ("HEADER\nKEY()\nKEY()\n", "appears twice"),
    ('HEADER\n{"type": "event", "at": 1, "event": "create", "key_id": "x", "actor": "a"}\n', "missing detail"),
    ('HEADER\n{"type": "auth_failures", "counts": {"x": -1}}\n', "counts"),
    ("HEADER\n" + "[" * 300_000 + "\n", "line 2: longer than 256 KiB"),
]


def _key_line(**changes: object) -> str:
    line = {"type": "key", "id": "AbCdEfGhIjKl", "name": "n", "key_hash": "0" * 64, "scopes": ["data:read"],
            "created_at": 1.5, "expires_at": None, "revoked_at": None, "last_used_at": None, "use_count": 0,
            "rate_limit": None, "allowed_ips": [], "replaces": None, "generation": 0}
    line.update(changes)
    return json.dumps(line)


@pytest.mark.parametrize(("text", "says"), BAD_LINES)
def test_a_bad_export_is_refused_naming_the_line_and_nothing_is_written(
        text: str, says: str, tmp_path: Path) -> None:
    from keys import MemoryKeyStore

    text = text.replace("HEADER", '{"format": "keygate-export", "version": 1}')
    while "KEY(" in text:
        start = text.index("KEY(")
        end = text.index(")\n", start)
        text = text[:start] + eval(f"_key_line({text[start + 4:end]})") + text[end + 1:]  # noqa: S307 -- test data
    dump = tmp_path / "bad.jsonl"
    dump.write_text(text)
    store = MemoryKeyStore()
    with pytest.raises(InvalidRequest) as info:
        import_export(store, dump, scopes=SCOPES)  # the service's vocabulary, as its CLI passes
    assert says in info.value.detail, info.value.detail
    assert store.count() == 0


@pytest.mark.slow  # a subprocess, other processes, or seconds of waiting
def test_the_cli_moves_keys_from_sqlite_to_postgresql(env: dict[str, str], tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    created = run_cli(env, "init", "--json")
    assert created.returncode == 0, created.stderr
    admin = json.loads(created.stdout)["admin_key"]["key"]
    other = json.loads(run_cli(env, "create-key", "--name", "o", "--scope", "data:read", "--json").stdout)
    exported = run_cli(env, "export", "--audit")
    assert exported.returncode == 0, exported.stderr
    lines = exported.stdout.splitlines()
    assert json.loads(lines[0])["format"] == "keygate-export"
    assert [json.loads(x)["type"] for x in lines[1:]] == ["key", "key", "event", "event", "auth_failures"]
    assert admin not in exported.stdout and other["key"] not in exported.stdout
    dump = tmp_path / "keys.jsonl"
    dump.write_text(exported.stdout)

    pg = {**env, "KEYGATE_DATABASE_URL": make_database_url("postgresql", tmp_path, request)}
    assert run_cli(pg, "init", "--no-admin-key").returncode == 0
    done = run_cli(pg, "import", str(dump), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"keys": 2, "events": 2}
    store = open_store(pg["KEYGATE_DATABASE_URL"])
    assert verify_key(store, admin).name == "admin" and verify_key(store, other["key"]).id == other["id"]
    store.close()
    again = run_cli(pg, "import", str(dump))  # never over what is there
    assert_one_line_failure(again, names="already holds 2 keys")
    assert_one_line_failure(run_cli(pg, "import", str(tmp_path / "missing.jsonl")), names="missing.jsonl")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_failure(run_cli(pg, "import", str(tmp_path / "binary")), names="not")
    assert_one_line_failure(run_cli(pg, "import", "/dev/zero"), names="not a regular file")
