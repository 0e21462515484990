"""``examples/reports.py``: a plain Flask app on ``keys/`` with its own scopes and a Bearer
source, exactly as the README's library section shows it, run as a user would run it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from conftest import ROOT

EXAMPLE = ROOT / "examples" / "reports.py"
SECTION = "Using `keys/` in your own Flask app"


def load_example() -> ModuleType:
    """A fresh copy of the module, as ``flask --app examples.reports`` would import it."""
    spec = importlib.util.spec_from_file_location("reports_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(SECTION)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {SECTION}' section"
    return re.findall(r"^```python\n(.*?)^```\s*$", m.group(1), flags=re.M | re.S)


def test_the_readme_shows_exactly_the_example() -> None:
    assert readme_python_blocks()[0] == EXAMPLE.read_text()


def test_the_example_is_small_and_writes_no_error_handler() -> None:
    source = EXAMPLE.read_text()
    assert len(source.splitlines()) < 60
    assert "errorhandler" not in source and "error_handler" not in source
    assert "flask_restx" not in source and "from api" not in source


@pytest.fixture
def example(tmp_path: Path):  # noqa: ANN201
    module = load_example()
    app = module.create_app(f"sqlite:///{tmp_path / 'reports-keys.db'}")
    runner = app.test_cli_runner()

    def create_key(name: str, *scopes: str) -> str:
        result = runner.invoke(args=["reports", "create-key", name, *scopes])
        assert result.exit_code == 0, result.output
        return result.output.strip()

    yield app, create_key
    app.extensions["keygate"].store.close()


def problem(resp, status: int, code: str) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = resp.get_json(force=True)
    assert body["status"] == status and body["code"] == code
    return body


def test_the_example_app(example) -> None:  # noqa: ANN001
    app, create_key = example
    reader, writer = create_key("dashboard", "reports:read"), create_key("etl", "reports:write", "reports:read")
    client = app.test_client()

    missing = client.get("/reports")
    problem(missing, 401, "missing_credentials")
    assert missing.headers["WWW-Authenticate"].startswith('Bearer realm="reports"')

    bad = client.get("/reports", headers={"API-Key": reader[:-1] + ("A" if reader[-1] != "A" else "B")})
    problem(bad, 401, "invalid_credentials")
    assert bad.headers["WWW-Authenticate"] == 'ApiKey realm="reports", error="invalid_token"'

    denied = client.put("/reports/q2", headers={"Authorization": f"Bearer {reader}"}, data="no")
    assert "reports:write" in problem(denied, 403, "insufficient_scope")["detail"]

    stored = client.put("/reports/q2", headers={"Authorization": f"Bearer {writer}"}, data="Costs down 2%.")
    assert stored.status_code == 201 and stored.get_json() == {"stored": "q2", "by": "etl"}
    listed = client.get("/reports", headers={"API-Key": reader})
    assert listed.status_code == 200 and listed.get_json() == {"reports": ["q1", "q2"], "reader": "dashboard"}

    summary = client.get("/reports/q2/summary", headers={"Authorization": f"Bearer {reader}"})  # async view
    assert summary.status_code == 200 and summary.get_json() == {"report": "q2", "summary": "Costs down 2%."}
    problem(client.get("/reports/q2/summary"), 401, "missing_credentials")


def test_the_example_cli_refuses_a_scope_the_app_does_not_have(example) -> None:  # noqa: ANN001
    app, _ = example
    result = app.test_cli_runner().invoke(args=["reports", "create-key", "x", "reports:delete"])
    assert result.exit_code != 0 and "unknown scope 'reports:delete'" in result.output
    assert "Traceback" not in result.output


def test_two_apps_from_the_example_factory_keep_their_own_stores(tmp_path: Path) -> None:
    module = load_example()
    first = module.create_app(f"sqlite:///{tmp_path / 'one.db'}")
    second = module.create_app(f"sqlite:///{tmp_path / 'two.db'}")
    key = first.test_cli_runner().invoke(args=["reports", "create-key", "one", "reports:read"]).output.strip()
    assert first.test_client().get("/reports", headers={"API-Key": key}).status_code == 200
    problem(second.test_client().get("/reports", headers={"API-Key": key}), 401, "invalid_credentials")
    for app in (first, second):
        app.extensions["keygate"].store.close()
