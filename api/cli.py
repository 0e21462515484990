"""The ``manage.py`` command line: issue, inspect and revoke keys; run the server.

Errors are one line on stderr and a non-zero exit (1 for a refused operation,
2 for bad usage, as click does) — never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from keys import (
    KeygateError,
    KeyRecord,
    find_by_plaintext,
    get_key,
    issue_key,
    revoke_key,
)
from keys.exc import InvalidRequest
from keys.history import usage_series
from keys.issuing import cli_actor, rotate_key, update_key
from keys.model import isoformat
from keys.parse import format_duration, parse_duration
from keys.tokens import TokenSigner, mint_token
from keys.store import KeyStore

from .config import load_serve_settings, load_settings
from .scopes import ADMIN, ALL_SCOPES, SCOPES


def fail(message: str, code: int = 1) -> NoReturn:
    # One line even when the message is not (a database driver's error can span several).
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


class Cli(click.Group):
    """Turns every expected failure into one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidRequest as e:
            fail(e.detail, 2)
        except KeygateError as e:
            fail(e.detail)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:  # a last resort: still no traceback for the user
            fail(f"unexpected {type(e).__name__}: {e}")


def _store(*, checked: bool = True) -> KeyStore:
    from .app import open_checked_store, open_configured_store

    settings = load_settings()
    return open_checked_store(settings) if checked else open_configured_store(settings)


def _duration(field: str) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    def convert(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_duration(value, field)
        except InvalidRequest as e:
            raise click.BadParameter(e.detail) from None

    return convert


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _describe(record: KeyRecord) -> str:
    m = record.metadata()
    lines = [f"{k:>13}: {'-' if v is None or v == [] else (', '.join(v) if isinstance(v, list) else v)}"
             for k, v in m.items()]
    return "\n".join(lines)


def _show_new_key(plaintext: str, record: KeyRecord, as_json: bool, **extra: Any) -> None:
    if as_json:
        _emit_json({**record.metadata(), **extra, "key": plaintext})
        return
    click.echo(f"Created key {record.id} ({record.name}), scopes: {' '.join(record.scopes)}", err=True)
    click.echo("Store it now; it will not be shown again:", err=True)
    click.echo(plaintext)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """keygate: API keys for a Flask-RESTX service."""


@cli.command()
@click.option("--no-admin-key", is_flag=True, help="Do not create an admin key in an empty store.")
@json_option
def init(no_admin_key: bool, as_json: bool) -> None:
    """Create or upgrade the key store; safe to repeat.

    In a store with no keys at all, also creates an admin key and prints it once.
    """
    store = _store(checked=False)
    version = store.migrate()
    issued = None
    if not no_admin_key and store.count() == 0:
        issued = issue_key(store, name="admin", scopes=[ADMIN], vocabulary=SCOPES)
    if as_json:
        _emit_json({
            "schema_version": version,
            "admin_key": None if issued is None else {**issued.record.metadata(), "key": issued.plaintext},
        })
        return
    click.echo(f"Key store ready at schema version {version}.", err=True)
    if issued is not None:
        click.echo(f"The store was empty: created admin key {issued.record.id}.", err=True)
        click.echo("Store it now; it will not be shown again:", err=True)
        click.echo(issued.plaintext)


@cli.command("create-key")
@click.option("--name", required=True, help="A label for the key's owner or purpose.")
@click.option("--scope", "scopes", multiple=True, required=True, type=click.Choice(ALL_SCOPES),
              help="A scope the key holds; repeat for several.")
@click.option("--expires-in", callback=_duration("--expires-in"), help="Lifetime, e.g. 90d.")
@click.option("--rate-limit", help="e.g. 100/minute (default: KEYGATE_DEFAULT_RATE_LIMIT).")
@click.option("--allow-ip", "allowed_ips", multiple=True, metavar="CIDR",
              help="Only accept the key from this block; repeat for several.")
@json_option
def create_key(name: str, scopes: Sequence[str], expires_in: int | None, rate_limit: str | None,
               allowed_ips: Sequence[str], as_json: bool) -> None:
    """Create a key and print it, once."""
    store = _store()
    issued = issue_key(store, name=name, scopes=scopes, expires_in=expires_in,
                       rate_limit=rate_limit, allowed_ips=allowed_ips, vocabulary=SCOPES)
    _show_new_key(issued.plaintext, issued.record, as_json)


@cli.command("list-keys")
@json_option
def list_keys(as_json: bool) -> None:
    """List every key's metadata (never a secret)."""
    store = _store()
    if as_json:
        # Streamed page by page, so a million keys never sit in memory at once.
        click.echo("[", nl=False)
        first, after = True, None
        while page := store.list_keys(limit=1000, after=after):
            for record in page:
                click.echo(("\n  " if first else ",\n  ") + json.dumps(record.metadata()), nl=False)
                first = False
            after = page[-1].id
        click.echo("\n]" if not first else "]")
        return
    click.echo(f"{'ID':<12}  {'NAME':<24}  {'SCOPES':<30}  {'STATE':<8}  EXPIRES")
    after = None
    now = time.time()
    while page := store.list_keys(limit=1000, after=after):
        for r in page:
            state = ("revoked" if r.revoked_at is not None and r.revoked_at <= now
                     else "expired" if r.expires_at is not None and r.expires_at <= now else "active")
            expires = r.metadata()["expires_at"] or "-"
            click.echo(f"{r.id:<12}  {r.name[:24]:<24}  {' '.join(r.scopes)[:30]:<30}  {state:<8}  {expires}")
        after = page[-1].id


@cli.command("show-key")
@click.argument("key_id")
@json_option
def show_key(key_id: str, as_json: bool) -> None:
    """Show one key's metadata."""
    record = get_key(_store(), key_id)
    if as_json:
        _emit_json(record.metadata())
    else:
        click.echo(_describe(record))


@cli.command("revoke-key")
@click.argument("key_id", required=False)
@click.option("--key", "plaintext", metavar="PLAINTEXT",
              help="Find the key by its value (a leaked key); '-' reads it from stdin.")
@json_option
def revoke_key_cmd(key_id: str | None, plaintext: str | None, as_json: bool) -> None:
    """Revoke a key now, by ID or by its plaintext value. Repeating it is harmless."""
    if (key_id is None) == (plaintext is None):
        raise click.UsageError("give either a key ID or --key PLAINTEXT")
    store = _store()
    if plaintext is not None:
        if plaintext == "-":
            plaintext = sys.stdin.readline().strip()
        key_id = find_by_plaintext(store, plaintext).id
    assert key_id is not None
    record = revoke_key(store, key_id)
    if as_json:
        _emit_json(record.metadata())
    else:
        click.echo(f"Revoked key {record.id} ({record.name}) at {record.metadata()['revoked_at']}.")


@cli.command("rotate-key")
@click.argument("key_id")
@click.option("--grace", callback=_duration("--grace"),
              help="Keep the old key working this long (e.g. 1h); default: it stops now.")
@json_option
def rotate_key_cmd(key_id: str, grace: int | None, as_json: bool) -> None:
    """Replace a key with a new one (same name, scopes, limits, allow-list)."""
    issued = rotate_key(_store(), key_id, grace=grace)
    if as_json:
        _emit_json({**issued.record.metadata(), "key": issued.plaintext})
        return
    when = f"in {format_duration(grace)}" if grace else "now"
    click.echo(f"Rotated {key_id} -> {issued.record.id}; the old key stops {when}.", err=True)
    click.echo("Store the new key now; it will not be shown again:", err=True)
    click.echo(issued.plaintext)


@cli.command("update-key")
@click.argument("key_id")
@click.option("--name", help="A new label.")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(ALL_SCOPES),
              help="The key's scopes from now on (replacing them all); repeat for several.")
@click.option("--rate-limit", help="A new limit, e.g. 100/minute.")
@click.option("--default-rate-limit", is_flag=True, help="Use KEYGATE_DEFAULT_RATE_LIMIT from now on.")
@click.option("--allow-ip", "allowed_ips", multiple=True, metavar="CIDR",
              help="The key's allow-list from now on (replacing it); repeat for several.")
@click.option("--any-ip", is_flag=True, help="Drop the allow-list: any address.")
@click.option("--expires-in", callback=_duration("--expires-in"), help="A new lifetime from now, e.g. 90d.")
@click.option("--no-expiry", is_flag=True, help="The key never expires.")
@json_option
def update_key_cmd(key_id: str, name: str | None, scopes: Sequence[str], rate_limit: str | None,
                   default_rate_limit: bool, allowed_ips: Sequence[str], any_ip: bool, expires_in: int | None,
                   no_expiry: bool, as_json: bool) -> None:
    """Edit a key in place, without rotating it. Other workers see the change within a second."""
    for given, cleared, names in ((rate_limit, default_rate_limit, "--rate-limit and --default-rate-limit"),
                                  (allowed_ips, any_ip, "--allow-ip and --any-ip"),
                                  (expires_in, no_expiry, "--expires-in and --no-expiry")):
        if given and cleared:
            raise click.UsageError(f"give one of {names}")
    edits: dict[str, Any] = {}
    if name is not None:
        edits["name"] = name
    if scopes:
        edits["scopes"] = list(scopes)
    if rate_limit is not None or default_rate_limit:
        edits["rate_limit"] = rate_limit
    if allowed_ips or any_ip:
        edits["allowed_ips"] = list(allowed_ips)
    if expires_in is not None or no_expiry:
        edits["expires_in"] = expires_in
    if not edits:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    record = update_key(_store(), key_id, edits, vocabulary=SCOPES)
    if as_json:
        _emit_json(record.metadata())
    else:
        click.echo(_describe(record))


@cli.command()
@click.argument("key_id")
@click.option("--since", callback=_duration("--since"), default="7d", show_default=True,
              help="How far back, e.g. 24h or 30d.")
@json_option
def usage(key_id: str, since: int, as_json: bool) -> None:
    """A key's requests per hour: accepted, refused by its rate limit, refused for a scope."""
    store = _store()
    get_key(store, key_id)
    now = time.time()
    try:
        buckets = usage_series(store, key_id, now - since + 1, now, "hour")
    except InvalidRequest:
        raise InvalidRequest(f"--since: at most 100 days of hours ({since // 86400} days asked)") from None
    if as_json:
        _emit_json({"key_id": key_id, "interval": "hour", "buckets": [b.as_dict() for b in buckets]})
        return
    click.echo(f"{'HOUR (UTC)':<20}  {'ACCEPTED':>9}  {'LIMITED':>8}  {'SCOPE':>6}")
    for b in buckets:
        if b.accepted or b.refused_limit or b.refused_scope:
            click.echo(f"{b.as_dict()['start']:<20}  {b.accepted:>9}  {b.refused_limit:>8}  {b.refused_scope:>6}")
    totals = [sum(getattr(b, f) for b in buckets) for f in ("accepted", "refused_limit", "refused_scope")]
    click.echo(f"{'total':<20}  {totals[0]:>9}  {totals[1]:>8}  {totals[2]:>6}")


@cli.command("mint-token")
@click.argument("key_id")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(ALL_SCOPES),
              help="Narrow the token to this scope; repeat for several (default: the key's).")
@click.option("--ttl", callback=_duration("--ttl"),
              help="Lifetime, e.g. 15m (default 15m, at most KEYGATE_TOKEN_MAX_TTL).")
@json_option
def mint_token_cmd(key_id: str, scopes: Sequence[str], ttl: int | None, as_json: bool) -> None:
    """Mint a short-lived query token (for ?token=) from a key."""
    settings = load_settings()
    store = _store()
    signer = TokenSigner(settings.secret_keys, settings.token_max_ttl, SCOPES)
    minted = mint_token(store, signer, get_key(store, key_id), actor=cli_actor(),
                        scopes=scopes or None, ttl=ttl)
    if as_json:
        _emit_json({"token": minted.token, "expires_at": isoformat(minted.expires_at),
                    "scopes": list(minted.scopes)})
        return
    click.echo(f"Token for {key_id} ({' '.join(minted.scopes)}), expires {isoformat(minted.expires_at)}:",
               err=True)
    click.echo(minted.token)


@cli.command()
@click.option("--key", "key_id", metavar="ID", help="Only this key's events.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@json_option
def audit(key_id: str | None, limit: int, as_json: bool) -> None:
    """Show the audit trail, newest first, and authentication failures per code."""
    store = _store()
    events = store.events(key_id=key_id, limit=limit)
    failures = store.auth_failures()
    if as_json:
        _emit_json({"events": [e.as_dict() for e in events], "auth_failures": failures})
        return
    for e in events:
        d = e.as_dict()
        detail = " ".join(f"{k}={v}" for k, v in sorted(e.detail.items()))
        click.echo(f"{d['at']}  {e.event:<10}  {e.key_id:<12}  {e.actor:<20}  {detail}".rstrip())
    if failures:
        click.echo("auth failures: " + ", ".join(f"{k}={v}" for k, v in sorted(failures.items())))


def _check_port_free(host: str, port: int) -> None:
    """One clear line now, rather than gunicorn retrying and logging for five seconds."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        fail(f"host {host!r}: {e.strerror}", 2)
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            fail(f"cannot listen on {host}:{port}: {e.strerror}")


@cli.command()
@click.option("--host", help="Address to listen on.  [default: KEYGATE_HOST, else 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535),
              help="Port to listen on.  [default: KEYGATE_PORT, else PORT, else 5000]")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Worker processes.  [default: KEYGATE_WORKERS, else one per core]")
@click.option("--certfile", metavar="PEM", help="Serve HTTPS with this certificate (chain), and --keyfile.  "
              "[default: KEYGATE_TLS_CERT]")
@click.option("--keyfile", metavar="PEM", help="The certificate's private key.  [default: KEYGATE_TLS_KEY]")
def serve(host: str | None, port: int | None, workers: int | None, certfile: str | None,
          keyfile: str | None) -> None:
    """Run the production server (granian)."""
    where = load_serve_settings(host=host, port=port, workers=workers, certfile=certfile, keyfile=keyfile)
    _store().close()  # fail here, in one line, rather than in every worker
    from .app import open_configured_limiter

    # The limit store's URL too (a bad port, say): it is only parsed when opened.
    open_configured_limiter(load_settings()).close()
    _check_port_free(where.host, where.port)
    from .server import ServeOptions
    from .server import serve as run

    scheme = "https" if where.certfile else "http"
    shown = f"[{where.host}]" if ":" in where.host else where.host
    click.echo(f"keygate serving on {scheme}://{shown}:{where.port} with {where.workers} "
               f"worker{'s' if where.workers != 1 else ''} (Swagger UI at /docs, the console at /login)", err=True)
    run(ServeOptions(host=where.host, port=where.port, workers=where.workers,
                     certfile=where.certfile, keyfile=where.keyfile))
