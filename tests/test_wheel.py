"""A non-editable install works from anywhere: the wheel (``pip wheel .``) in a fresh
virtualenv, driven from an empty directory as someone who ran ``pip install keygate`` would.

The wheel carries ``openapi.yaml`` (so ``/openapi.json`` and ``/docs`` show the OpenAPI 3
contract), installs no top-level ``manage`` module, keeps instance data and ``.env`` in the
working directory, and writes nothing into site-packages.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import ROOT, assert_no_credentials, free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]  # one worker: the wheel and its venv are built once


def run(args: list[str], **kw) -> subprocess.CompletedProcess[str]:  # noqa: ANN003
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, a fresh virtualenv with it installed). The dependencies come from pip's
    cache or the registry as wheels, once, into the wheelhouse the venv installs from."""
    base = tmp_path_factory.mktemp("wheel")
    wheelhouse = base / "wheelhouse"
    # A copy of the tree as git knows it, so nothing built lands in the checkout (build/, egg-info).
    source = base / "source"
    source.mkdir()
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        src, dst = ROOT / name, source / name
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the work tree, not yet in git
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            dst.write_bytes(src.read_bytes())
    run([sys.executable, "-m", "pip", "wheel", "--quiet", str(source), "-w", str(wheelhouse)])
    wheel = next(wheelhouse.glob("keygate-*.whl"))
    venv = base / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
         "--find-links", str(wheelhouse), "keygate"])
    return wheel, venv


def test_the_wheel_carries_the_contract_and_no_manage_module(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "api/openapi.yaml" in names and "keys/py.typed" in names
    assert not [n for n in names if n.startswith("manage")]
    assert not [n for n in names if n.startswith(("tests/", "examples/", "bench/"))]
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("api/openapi.yaml") == (ROOT / "openapi.yaml").read_bytes()


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_keygate_from_an_empty_directory(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, venv = installed
    site = _site_packages(venv)
    before = _snapshot(site)
    work = tmp_path / "somewhere"
    work.mkdir()
    # The working directory's .env is honoured (a limit that shows in every response).
    (work / ".env").write_text("KEYGATE_DEFAULT_RATE_LIMIT=7/minute\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYGATE_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    keygate = str(venv / "bin" / "keygate")

    init = json.loads(run([keygate, "init", "--json"], cwd=work, env=env).stdout)
    created = json.loads(run([keygate, "create-key", "--name", "ci", "--scope", "data:read", "--json"],
                             cwd=work, env=env).stdout)
    assert init["admin_key"]["key"] and created["key"]

    instance = work / "instance"
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    for name in ("keygate.db", "secret_key"):
        assert stat.S_IMODE((instance / name).stat().st_mode) == 0o600, name

    # No top-level manage module; the import names are api and keys, from site-packages.
    probe = run([str(venv / "bin" / "python"), "-c",
                 "import importlib.util as u, api, keys, api.openapi as o; "
                 "print(u.find_spec('manage') is None, o.OPENAPI_PATH.is_file(), api.__file__)"],
                cwd=work, env=env).stdout.split()
    assert probe[:2] == ["True", "True"] and probe[2].startswith(str(site))

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([keygate, "serve", "--port", str(port), "--workers", "1"], cwd=work,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if requests.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        document = requests.get(url + "/openapi.json", timeout=10)
        assert document.status_code == 200 and document.json()["openapi"].startswith("3.")
        assert document.json()["info"]["version"] == "0.1.0"
        docs = requests.get(url + "/docs", timeout=10)
        assert docs.status_code == 200 and 'url: "/openapi.json"' in docs.text
        data = requests.get(url + "/data", headers={"API-Key": created["key"]}, timeout=10)
        assert data.status_code == 200 and data.json()["caller"]["name"] == "ci"
        assert data.headers["RateLimit-Policy"] == '"key";q=7;w=60'
    finally:
        server.terminate()
        server.wait(30)
    assert_no_credentials(log.read_text(), "the installed server's output")

    assert {"keygate.db", "secret_key"} <= {p.name for p in instance.iterdir()}
    assert _snapshot(site) == before, "keygate wrote into site-packages"


def test_the_wheel_carries_the_console(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """Every template and static file of the console is in the wheel: a page renders from it."""
    wheel, venv = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "api" / "console").rglob("*")
               if p.is_file() and p.suffix in (".html", ".css", ".js", "") and "__pycache__" not in p.parts}
    assert shipped and shipped <= names, sorted(shipped - names)
    script = ("from api import create_app; "
              "app = create_app({'DATABASE_URL': 'memory://', 'SECRET_KEY': __import__('secrets').token_hex(32), 'INSTANCE_PATH': 'i'}, "
              "store=__import__('keys').MemoryKeyStore()); c = app.test_client(); "
              "print(c.get('/login').status_code, c.get('/dashboard/static/simple.css').status_code)")
    done = run([str(venv / "bin" / "python"), "-c", script], cwd=tmp_path)
    assert done.stdout.split() == ["200", "200"], done.stdout
