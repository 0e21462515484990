"""keygate's HTTP service. WSGI target: ``api:create_app()``."""

from .app import create_app

__all__ = ["create_app"]
