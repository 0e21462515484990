"""A plain Flask app guarded by keygate's library: its own scopes, keys sent as
``Authorization: Bearer <key>`` or in an ``API-Key`` header, and an async view."""

import asyncio

import click
from flask import Blueprint, Flask, g, request

from keys import BearerKey, HeaderKey, KeyAuth, KeygateError, issue_key, open_store

auth = KeyAuth(
    sources=[BearerKey(), HeaderKey()],  # Authorization: Bearer <key>, or API-Key: <key>
    scopes=["reports:read", "reports:write"],
    realm="reports",
)
reports = Blueprint("reports", __name__)
REPORTS = {"q1": "Revenue up 4%, costs flat."}


@reports.get("/reports")
@auth.require("reports:read")
def list_reports() -> dict[str, object]:
    return {"reports": sorted(REPORTS), "reader": g.principal.name}


@reports.put("/reports/<name>")
@auth.require("reports:write")
def write_report(name: str) -> tuple[dict[str, str], int]:
    REPORTS[name] = request.get_data(as_text=True)[:10_000]
    return {"stored": name, "by": g.principal.name}, 201


@reports.get("/reports/<name>/summary")
@auth.require("reports:read")
async def summary(name: str) -> dict[str, str]:
    await asyncio.sleep(0)  # stands in for awaiting a database or another service
    return {"report": name, "summary": REPORTS.get(name, "")[:40]}


@reports.cli.command("create-key")
@click.argument("name")
@click.argument("scopes", nargs=-1, required=True)
def create_key(name: str, scopes: tuple[str, ...]) -> None:
    """Print a new key for NAME holding SCOPES (shown once: only its hash is stored)."""
    try:
        click.echo(issue_key(auth.store, name=name, scopes=scopes, vocabulary=auth.scopes).plaintext)
    except KeygateError as e:
        raise click.ClickException(e.detail) from None


def create_app(database_url: str = "sqlite:///reports-keys.db") -> Flask:
    app = Flask(__name__)
    store = open_store(database_url)
    store.migrate()  # creates or upgrades the key tables; safe to repeat
    auth.init_app(app, store)
    app.register_blueprint(reports)
    return app
