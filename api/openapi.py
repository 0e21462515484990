"""``GET /openapi.json``: the OpenAPI 3.0.3 contract (``openapi.yaml``) as JSON.

The document is the repository's top-level ``openapi.yaml``; ``api/openapi.yaml`` is a
symbolic link to it, which the build turns into a file of the installed package
(pyproject.toml's package-data), so a checkout and an installed wheel read the same.

A plain Flask route, not a Flask-RESTX resource, so it stays out of RESTX's own
Swagger 2.0 document. The file is parsed once per process (per file version),
not per request; it is the same document the tests check against the routes, and the one
the Swagger UI at /docs shows (OpenAPI 3.0.3, which RESTX's bundled Swagger UI 4 renders).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import yaml
from flask import Flask, Response, current_app

from keys.exc import NotFound

OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.yaml"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@lru_cache(maxsize=4)
def _rendered(path: Path, mtime_ns: int) -> str:
    with path.open(encoding="utf-8") as f:
        return json.dumps(yaml.load(f, Loader=_Loader))  # noqa: S506 (a safe loader)


def load_document(path: Path = OPENAPI_PATH) -> str | None:
    """The document as JSON text; ``None`` when this copy of keygate has no openapi.yaml."""
    try:
        return _rendered(path, path.stat().st_mtime_ns)
    except FileNotFoundError:
        return None


@lru_cache(maxsize=1)
def package_version() -> str:
    """keygate's version (pyproject.toml's, as installed): the ``info.version`` of openapi.yaml
    and of Flask-RESTX's own document, so a client can tell which contract it talks to.
    Read once per process: ``importlib.metadata`` scans every distribution (2.5 ms a call)."""
    try:
        return metadata.version("keygate")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def with_token_max_ttl(body: str, token_max_ttl: int) -> str:
    """The document as this server answers: ``TokenRequest.ttl``'s maximum is its
    ``KEYGATE_TOKEN_MAX_TTL`` (openapi.yaml says the default, 24 hours)."""
    document = json.loads(body)
    ttl = document.get("components", {}).get("schemas", {}).get("TokenRequest", {}) \
        .get("properties", {}).get("ttl")
    if ttl is None or ttl.get("maximum") == token_max_ttl:
        return body
    ttl["maximum"] = token_max_ttl
    return json.dumps(document)


def register(app: Flask, path: Path = OPENAPI_PATH, token_max_ttl: int | None = None) -> None:
    body = load_document(path)
    if body is not None and token_max_ttl is not None:
        body = with_token_max_ttl(body, token_max_ttl)

    def openapi_json() -> Response:
        if body is None:
            raise NotFound(f"{path.name} is not installed with this copy of keygate")
        return current_app.response_class(body, mimetype="application/json")

    app.add_url_rule("/openapi.json", "openapi", openapi_json, methods=["GET"])
