"""Settings from ``KEYGATE_*`` environment variables (a ``.env`` file is honoured).

Paths are the working directory's, never the code's: ``.env`` and the default
``instance/`` are where keygate is run from (a checkout's root for ``make run``),
so an installed keygate never writes into site-packages.

Everything is validated here, at start-up, so a bad value stops the service
with one line naming the variable instead of failing on the first request.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import load_dotenv

from keys.exc import ConfigError, InvalidRequest
from keys.parse import format_duration, parse_duration, parse_rate_limit
from keys.ratelimit_redis import check_prefix
from keys.strength import GENERATE_SECRET, MIN_LENGTH
from keys.strength import weakness as secret_weakness

PREFIX = "KEYGATE_"
MIN_SECRET_LENGTH = MIN_LENGTH
#: The shortest audit retention taken: anything less is likelier a unit left out than intent.
MIN_RETENTION = 86400
LOG_FORMATS = ("text", "json")
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def dotenv_path() -> Path:
    """The ``.env`` file honoured: the working directory's."""
    return Path.cwd() / ".env"


def default_instance_path() -> Path:
    """Where instance data goes unless ``KEYGATE_INSTANCE_PATH`` says: ``./instance``."""
    return Path.cwd() / "instance"


@dataclass(frozen=True)
class Settings:
    database_url: str
    secret_keys: tuple[str, ...]
    ratelimit_storage_url: str | None
    default_rate_limit: str
    token_max_ttl: int
    trusted_proxies: int
    instance_path: Path
    ratelimit_fail_open: bool = False
    ratelimit_prefix: str = "keygate:"
    audit_retention: int = 90 * 86400
    cors_origins: tuple[str, ...] = ()
    log_format: str = "text"
    usage_retention: int = 90 * 86400
    auth_failure_limit: str = "30/minute"


def _secret_from_file(instance: Path) -> str:
    """Read ``instance/secret_key``, creating it (mode 0600) the first time.

    ``O_EXCL`` makes concurrent first starts agree on one secret.
    """
    path = instance / "secret_key"
    try:
        instance.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"KEYGATE_SECRET_KEY: {path} is readable by others (mode {mode:o}); chmod 600 it")
        value = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"KEYGATE_SECRET_KEY: cannot read or create {path}: {e.strerror}") from None
    if not value:  # a writer was killed between create and write
        raise ConfigError(f"KEYGATE_SECRET_KEY: {path} is empty; delete it to generate a new one")
    return value


def _secret_keys(raw: str | None, instance: Path) -> tuple[str, ...]:
    if raw is None:
        return (_secret_from_file(instance),)
    keys = tuple(part.strip() for part in raw.split(","))
    if not any(keys):
        raise ConfigError("KEYGATE_SECRET_KEY is set but empty; unset it to use instance/secret_key")
    for i, key in enumerate(keys, 1):
        why = secret_weakness(key)
        if why is not None:
            which = f"secret #{i}" if len(keys) > 1 else "the secret"
            raise ConfigError(
                f"KEYGATE_SECRET_KEY: {which} is too weak ({why}); generate one with {GENERATE_SECRET}"
            )
    return keys


def _storage_url(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in ("memory", "redis", "rediss", "redis+unix"):
        raise ConfigError(
            f"KEYGATE_RATELIMIT_STORAGE_URL: unknown storage {scheme or raw[:30]!r}; use redis://host:port"
        )
    return raw


_ORIGIN_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _cors_origins(raw: str | None) -> tuple[str, ...]:
    """Exact origins (``https://app.example.com``), comma-separated: no wildcards, no paths."""
    origins = tuple(o.strip().rstrip("/") for o in (raw or "").split(",") if o.strip())
    for origin in origins:
        if not _ORIGIN_RE.fullmatch(origin):
            raise ConfigError(
                f"KEYGATE_CORS_ORIGINS: {origin[:60]!r} is not an origin like https://app.example.com"
            )
    return origins


@dataclass(frozen=True)
class ServeSettings:
    """Where and how wide ``serve`` listens: its options, else the environment, else defaults."""

    host: str
    port: int
    workers: int
    certfile: Path | None
    keyfile: Path | None
    threads: int | None = None  # None: as the backends need (``default_threads``)


def default_threads(settings: Settings) -> int:
    """Python threads per worker when ``serve`` isn't told: one while every request is
    answered from this host (SQLite or memory, the embedded limiter), where more threads
    only fight over the GIL; four once a request may wait on the network (PostgreSQL,
    Redis), so that wait isn't the whole worker's (measured: bench/README.md)."""
    local_store = settings.database_url.startswith(("sqlite:", "memory:"))
    local_limits = settings.ratelimit_storage_url in (None, "memory://")
    return 1 if local_store and local_limits else 4


def default_workers() -> int:
    """One worker per core this process may run on (a container's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _whole_number(raw: str, name: str, low: int, high: int, what: str) -> int:
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ConfigError(f"{name} must be {what} ({low}-{high}), not {raw[:20]!r}")
    return int(raw)


def _pem_files(certfile: str | None, keyfile: str | None, names: tuple[str, str]) -> tuple[Path | None, Path | None]:
    """Both or neither; readable; a certificate and the key that goes with it."""
    if not certfile and not keyfile:
        return None, None
    if not certfile or not keyfile:
        missing = names[0] if not certfile else names[1]
        raise ConfigError(f"{missing} is needed too: HTTPS takes a certificate and its key")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        which = names[0] if e.filename == certfile else names[1]
        raise ConfigError(f"{which}: no such file {e.filename!r}") from None
    except PermissionError as e:
        raise ConfigError(f"{names[0]}/{names[1]}: cannot read {e.filename!r}") from None
    except ssl.SSLError as e:
        raise ConfigError(
            f"{names[0]}/{names[1]}: not a PEM certificate and matching private key ({e.reason or e})"
        ) from None
    return Path(certfile), Path(keyfile)


def load_serve_settings(
    *, host: str | None = None, port: int | None = None, workers: int | None = None,
    threads: int | None = None, certfile: str | None = None, keyfile: str | None = None,
) -> ServeSettings:
    """``serve``'s options win, then ``KEYGATE_*`` (``PORT`` after ``KEYGATE_PORT``, as
    platforms that assign a port set it), then 127.0.0.1:5000 and a worker per core."""
    load_dotenv(dotenv_path(), override=False)
    env = os.environ
    if port is None:
        for name in ("KEYGATE_PORT", "PORT"):
            if env.get(name):
                port = _whole_number(env[name], name, 1, 65535, "a port number")
                break
    if workers is None and env.get("KEYGATE_WORKERS"):
        workers = _whole_number(env["KEYGATE_WORKERS"], "KEYGATE_WORKERS", 1, 64, "a number of workers")
    if threads is None and env.get("KEYGATE_THREADS"):
        threads = _whole_number(env["KEYGATE_THREADS"], "KEYGATE_THREADS", 1, 64, "a number of threads")
    names = ("--certfile", "--keyfile") if certfile or keyfile else ("KEYGATE_TLS_CERT", "KEYGATE_TLS_KEY")
    if not (certfile or keyfile):
        certfile, keyfile = env.get("KEYGATE_TLS_CERT"), env.get("KEYGATE_TLS_KEY")
    cert, key = _pem_files(certfile, keyfile, names)
    return ServeSettings(
        host=host or env.get("KEYGATE_HOST") or "127.0.0.1",
        port=5000 if port is None else port,
        workers=default_workers() if workers is None else workers,
        certfile=cert,
        keyfile=key,
        threads=threads,
    )


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from ``overrides`` (keys without the prefix), then the environment, then defaults."""
    load_dotenv(dotenv_path(), override=False)
    overrides = dict(overrides or {})

    def get(name: str) -> Any:
        if name in overrides:
            return overrides[name]
        return os.environ.get(PREFIX + name)

    instance = Path(get("INSTANCE_PATH") or default_instance_path())
    database_url = get("DATABASE_URL") or f"sqlite:///{instance / 'keygate.db'}"

    default_rate = get("DEFAULT_RATE_LIMIT") or "600/minute"
    try:
        default_rate = str(parse_rate_limit(default_rate, "KEYGATE_DEFAULT_RATE_LIMIT"))
        auth_failure_limit = str(parse_rate_limit(get("AUTH_FAILURE_LIMIT") or "30/minute",
                                                  "KEYGATE_AUTH_FAILURE_LIMIT"))
        max_ttl = parse_duration(get("TOKEN_MAX_TTL") or "24h", "KEYGATE_TOKEN_MAX_TTL")
        audit_retention = parse_duration(get("AUDIT_RETENTION") or "90d", "KEYGATE_AUDIT_RETENTION")
        usage_retention = parse_duration(get("USAGE_RETENTION") or "90d", "KEYGATE_USAGE_RETENTION")
    except InvalidRequest as e:
        raise ConfigError(e.detail) from None
    for name, kept in (("KEYGATE_AUDIT_RETENTION", audit_retention), ("KEYGATE_USAGE_RETENTION", usage_retention)):
        if kept < MIN_RETENTION:  # "90" is seconds: meant as days, it would delete the history
            raise ConfigError(f"{name} must be at least 1d (it is {format_duration(kept)}); "
                              "write days with a d, as in 90d")

    proxies_raw = str(get("TRUSTED_PROXIES") or "0")
    if not proxies_raw.isdigit() or int(proxies_raw) > 10:
        raise ConfigError("KEYGATE_TRUSTED_PROXIES must be the number of proxies in front (0-10)")

    fail_open_raw = str(get("RATELIMIT_FAIL_OPEN") or "0").strip().lower()
    if fail_open_raw not in _BOOLEANS:
        raise ConfigError("KEYGATE_RATELIMIT_FAIL_OPEN must be 1/true/yes or 0/false/no")

    try:
        prefix = check_prefix(get("RATELIMIT_PREFIX") or "keygate:")
    except ValueError as e:
        raise ConfigError(f"KEYGATE_RATELIMIT_PREFIX: {e}") from None

    log_format = str(get("LOG_FORMAT") or "text").strip().lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"KEYGATE_LOG_FORMAT must be {' or '.join(LOG_FORMATS)}, not {log_format[:20]!r}")

    return Settings(
        database_url=database_url,
        secret_keys=_secret_keys(get("SECRET_KEY"), instance),
        ratelimit_storage_url=_storage_url(get("RATELIMIT_STORAGE_URL")),
        default_rate_limit=default_rate,
        token_max_ttl=max_ttl,
        trusted_proxies=int(proxies_raw),
        instance_path=instance,
        ratelimit_fail_open=_BOOLEANS[fail_open_raw],
        ratelimit_prefix=prefix,
        audit_retention=audit_retention,
        cors_origins=_cors_origins(get("CORS_ORIGINS")),
        log_format=log_format,
        usage_retention=usage_retention,
        auth_failure_limit=auth_failure_limit,
    )
