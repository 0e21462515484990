"""The ``manage.py`` command line: issue, inspect and revoke keys; run the server.

Errors are one line on stderr and a non-zero exit (1 for a refused operation,
2 for bad usage, as click does) — never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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
from keys.exc import InvalidRequest, StoreUnavailable
from keys.history import usage_series
from keys.issuing import cli_actor, not_a_key_id, rotate_key, update_key
from keys.keyformat import PREFIX
from keys.model import isoformat
from keys.parse import format_duration, parse_duration
from keys.tokens import TokenSigner, mint_token
from keys.store import KeyStore
from keys.store.breaker import describe
from keys.strength import GENERATE_SECRET

from .config import Settings, default_threads, load_serve_settings, load_settings
from .openapi import package_version
from .scopes import ADMIN, ALL_SCOPES, SCOPES

#: The option a refused field of the key API came from, to name it as the user typed it.
_OPTION_FOR_FIELD = {"name": "--name", "scopes": "--scope", "expires_in": "--expires-in",
                     "rate_limit": "--rate-limit", "allowed_ips": "--allow-ip", "ttl": "--ttl",
                     "grace": "--grace"}


def fail(message: str, code: int = 1) -> NoReturn:
    # One line even when the message is not (a database driver's error can span several).
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def _as_typed(error: InvalidRequest) -> str:
    """The API's words for a bad field (``rate_limit: …``), naming the option instead."""
    option = _OPTION_FOR_FIELD.get(error.field or "")
    field = error.field or ""
    if option and error.detail.startswith(field) and error.detail[len(field):][:1] in (":", " "):
        return option + error.detail[len(field):]
    return error.detail


def _reader_went_away() -> NoReturn:
    """stdout's reader has gone (``list-keys | head -1``): stop quietly, as Unix tools do."""
    try:  # the interpreter's last flush of stdout must not fail (and complain) again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(141)  # 128 + SIGPIPE: what a shell shows for a tool that stopped this way


class Cli(click.Group):
    """Turns every expected failure, click's usage errors included, into one line on stderr."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:  # click's own is four lines: usage, a hint, a blank, the error
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            fail(e.format_message().rstrip(".") + where, e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.Abort:
            fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidRequest as e:
            fail(_as_typed(e), 2)
        except StoreUnavailable as e:
            # The operator, unlike an API client, is told the cause (one line).
            fail(e.detail if e.__cause__ is None else f"{e.detail} ({describe(e.__cause__)})")
        except KeygateError as e:
            fail(e.detail)
        except BrokenPipeError:
            _reader_went_away()
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:  # a last resort: still no traceback for the user
            fail(f"unexpected {type(e).__name__}: {e}")


def _settings() -> Settings:
    """This command's settings, read once (a missing secret is generated on first read)."""
    meta = click.get_current_context().meta
    if "keygate.settings" not in meta:
        meta["keygate.settings"] = load_settings()
    settings: Settings = meta["keygate.settings"]
    return settings


def _store(*, checked: bool = True) -> KeyStore:
    from .app import open_checked_store, open_configured_store

    settings = _settings()
    store = open_checked_store(settings) if checked else open_configured_store(settings)
    click.get_current_context().call_on_close(store.close)  # also when run in-process (tests)
    return store


def _duration(field: str) -> Callable[[click.Context, click.Parameter, str | None], int | None]:
    def convert(ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_duration(value, field)
        except InvalidRequest as e:  # a UsageError: click's BadParameter would name the option twice
            raise click.UsageError(e.detail, ctx) from None

    return convert


def _metadata(record: KeyRecord) -> dict[str, Any]:
    """A key's metadata as the API shows it: its state now, and the rate limit in force."""
    return record.metadata(default_rate_limit=_settings().default_rate_limit)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _describe(record: KeyRecord) -> str:
    m = _metadata(record)
    if record.rate_limit is None:
        m["rate_limit"] = f"{m['rate_limit']} (the default)"
    lines = [f"{k:>13}: {'-' if v is None or v == [] else (', '.join(v) if isinstance(v, list) else v)}"
             for k, v in m.items()]
    return "\n".join(lines)


def _stdout_is_a_terminal() -> bool:
    return sys.stdout.isatty()


def _print_secret(plaintext: str) -> None:
    """The key alone on stdout, so ``KEY=$(…)`` captures just it. The advice above it is
    for a person reading a terminal; above a captured key it would introduce nothing."""
    if _stdout_is_a_terminal():
        click.echo("Store it now; it will not be shown again:", err=True)
    else:
        click.echo("The key is on standard output, shown this once (only its hash is stored).", err=True)
    click.echo(plaintext)


def _show_new_key(plaintext: str, record: KeyRecord, as_json: bool, **extra: Any) -> None:
    if as_json:
        _emit_json({**_metadata(record), **extra, "key": plaintext})
        return
    click.echo(f"Created key {record.id} ({record.name}), scopes: {' '.join(record.scopes)}.", err=True)
    _print_secret(plaintext)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), "--version", prog_name="keygate", message="%(prog)s %(version)s")
def cli() -> None:
    """keygate: API keys for a Flask-RESTX service."""
    # The library logs outages for a server's log; here the one error line says it all
    # (Python would otherwise print those warnings on stderr too). `serve` configures its own.
    logging.getLogger("keygate").addHandler(logging.NullHandler())


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
            "admin_key": None if issued is None else {**_metadata(issued.record), "key": issued.plaintext},
        })
        return
    click.echo(f"Key store ready at schema version {version}.", err=True)
    if "KEYGATE_SECRET_KEY" not in os.environ:
        click.echo("Query tokens are signed with the secret generated in the instance directory; "
                   f"to set your own, KEYGATE_SECRET_KEY=$({GENERATE_SECRET}) (the same on every "
                   "instance).", err=True)
    if issued is not None:
        click.echo(f"The store was empty: created admin key {issued.record.id}.", err=True)
        _print_secret(issued.plaintext)


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
    """List every key's metadata (never a secret); the table is oldest first."""
    store = _store()
    if as_json:
        # Streamed page by page, so a million keys never sit in memory at once.
        click.echo("[", nl=False)
        first, after = True, None
        while page := store.list_keys(limit=1000, after=after):
            for record in page:
                click.echo(("\n  " if first else ",\n  ") + json.dumps(_metadata(record)), nl=False)
                first = False
            after = page[-1].id
        click.echo("\n]" if not first else "]")
        return
    records: list[KeyRecord] = []
    after = None
    while page := store.list_keys(limit=1000, after=after):  # pages come in id order
        records += page
        after = page[-1].id
    records.sort(key=lambda r: (r.created_at, r.id))
    now = time.time()
    click.echo(f"{'ID':<12}  {'NAME':<20}  {'SCOPES':<24}  {'STATE':<7}  {'CREATED (UTC)':<16}  "
               f"{'LAST USED':<16}  EXPIRES")
    for r in records:
        click.echo(f"{r.id:<12}  {r.name[:20]:<20}  {' '.join(r.scopes)[:24]:<24}  {r.state(now):<7}  "
                   f"{_minute(r.created_at):<16}  {_minute(r.last_used_at):<16}  {_minute(r.expires_at)}")


def _minute(ts: float | None) -> str:
    """A table's timestamp: UTC to the minute, ``-`` when unset."""
    text = isoformat(ts)
    return "-" if text is None else text[:16].replace("T", " ")


@cli.command("show-key")
@click.argument("key_id")
@json_option
def show_key(key_id: str, as_json: bool) -> None:
    """Show one key's metadata (ID: the 12 characters after kg_; list-keys shows them)."""
    record = get_key(_store(), key_id)
    if as_json:
        _emit_json(_metadata(record))
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
    if key_id is not None and key_id.strip().startswith(PREFIX):
        fail(f"{not_a_key_id(key_id)}; to revoke a key by its value, use --key - (reads it from stdin)")
    store = _store()
    if plaintext is not None:
        if plaintext == "-":
            plaintext = sys.stdin.readline().strip()
        key_id = find_by_plaintext(store, plaintext).id
    assert key_id is not None
    record = revoke_key(store, key_id)
    if as_json:
        _emit_json(_metadata(record))
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
        _emit_json({**_metadata(issued.record), "key": issued.plaintext})
        return
    when = f"in {format_duration(grace)} (its state is 'grace' meanwhile)" if grace else "now"
    click.echo(f"Rotated {key_id} -> {issued.record.id}; the old key stops {when}.", err=True)
    _print_secret(issued.plaintext)


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
    settings = _settings()
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


def _detail_text(detail: dict[str, Any]) -> str:
    """An event's detail for a table: ``scopes=secret:read,data:read name=billing``."""
    def text(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value)) or "-"
        return "-" if value is None else str(value)

    return " ".join(f"{k}={text(v)}" for k, v in sorted(detail.items()))


@cli.command()
@click.option("--key", "key_id", metavar="ID", help="Only this key's events.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@json_option
def audit(key_id: str | None, limit: int, as_json: bool) -> None:
    """Show the audit trail, newest first, and authentication failures per code."""
    store = _store()
    if key_id is not None:
        get_key(store, key_id)  # an unknown id is an error, not an empty trail
    events = store.events(key_id=key_id, limit=limit)
    failures = store.auth_failures()
    if as_json:
        _emit_json({"events": [e.as_dict() for e in events], "auth_failures": failures})
        return
    click.echo(f"{'AT (UTC)':<20}  {'EVENT':<10}  {'KEY':<12}  {'ACTOR':<20}  DETAIL")
    for e in events:
        at = (isoformat(e.at) or "")[:19].replace("T", " ")
        click.echo(f"{at:<20}  {e.event:<10}  {e.key_id:<12}  {e.actor[:20]:<20}  {_detail_text(e.detail)}".rstrip())
    if not events:
        click.echo("(no events)")
    if key_id is None:  # the failure counts are per code, not per key: only in the whole trail
        click.echo("")
        click.echo(f"{'AUTH FAILURES':<24}  COUNT")
        for code, count in sorted(failures.items()):
            click.echo(f"{code:<24}  {count}")
        if not failures:
            click.echo("(none)")


@cli.command("export")
@click.option("--audit", is_flag=True, help="Also the audit trail and the failure counts.")
def export_cmd(audit: bool) -> None:
    """Write every key (metadata and hash; there is no plaintext) as JSON lines on stdout.

    A backup, and the way from one store to another: `keygate export > keys.jsonl`, then
    `keygate import keys.jsonl` with KEYGATE_DATABASE_URL naming the new store.
    """
    from keys.backup import export_lines

    store = _store()
    out = click.get_text_stream("stdout")
    for line in export_lines(store, audit=audit):
        out.write(line + "\n")
    out.flush()


@cli.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def import_cmd(file: Path, as_json: bool) -> None:
    """Load an export into an empty store (any backend); refuses a store that holds keys.

    Every line is checked before anything is written, and the load is one transaction.
    """
    from keys.backup import check_export, import_export

    checked = check_export(file, SCOPES)  # a bad file is named before any store is touched
    store = _store()
    present = store.count()
    if present:
        fail(f"the store already holds {present} key{'s' if present != 1 else ''}; "
             "import loads into an empty store only (nothing was changed)")
    done = import_export(store, file, checked, SCOPES)
    if as_json:
        _emit_json({"keys": done.keys, "events": done.events})
    else:
        click.echo(f"Imported {done.keys} keys and {done.events} audit events into the "
                   f"{store.backend} store.", err=True)


def _check_port_free(host: str, port: int) -> None:
    """One clear line now, rather than the server failing to bind in every worker."""
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
@click.option("--threads", type=click.IntRange(1, 64),
              help="Python threads per worker.  [default: KEYGATE_THREADS, else 1, or 4 with "
              "PostgreSQL or Redis]")
@click.option("--certfile", metavar="PEM", help="Serve HTTPS with this certificate (chain), and --keyfile.  "
              "[default: KEYGATE_TLS_CERT]")
@click.option("--keyfile", metavar="PEM", help="The certificate's private key.  [default: KEYGATE_TLS_KEY]")
def serve(host: str | None, port: int | None, workers: int | None, threads: int | None,
          certfile: str | None, keyfile: str | None) -> None:
    """Run the production server (granian)."""
    where = load_serve_settings(host=host, port=port, workers=workers, threads=threads,
                                certfile=certfile, keyfile=keyfile)
    _store().close()  # fail here, in one line, rather than in every worker
    from .app import open_configured_limiter

    # The limit store's URL too (a bad port, say): it is only parsed when opened.
    settings = load_settings()
    open_configured_limiter(settings).close()
    _check_port_free(where.host, where.port)
    from .metrics import DIRECTORY_NAME as METRICS_DIRECTORY
    from .server import ServeOptions
    from .server import serve as run

    scheme = "https" if where.certfile else "http"
    shown = f"[{where.host}]" if ":" in where.host else where.host
    notice = (f"keygate serving on {scheme}://{shown}:{where.port} with {where.workers} "
              f"worker{'s' if where.workers != 1 else ''} (Swagger UI at /docs, the console at /login)")
    if settings.log_format == "json":
        from .logformat import json_line

        notice = json_line(notice)
    click.echo(notice, err=True)
    run(ServeOptions(host=where.host, port=where.port, workers=where.workers,
                     threads=where.threads or default_threads(settings),
                     certfile=where.certfile, keyfile=where.keyfile, log_format=settings.log_format,
                     metrics_dir=settings.instance_path / METRICS_DIRECTORY))
