"""The service's scopes: one per protected page (and /metrics), and ``admin``, which opens everything."""

from __future__ import annotations

from keys import Scopes

SECRET_READ = "secret:read"
DATA_READ = "data:read"
METRICS_READ = "metrics:read"
ADMIN = "admin"

#: Every scope keygate's service knows, in display order.
ALL_SCOPES: tuple[str, ...] = (SECRET_READ, DATA_READ, METRICS_READ, ADMIN)
#: The vocabulary the service gives the library: these names, ``admin`` implying the rest.
SCOPES = Scopes(ALL_SCOPES, superscope=ADMIN)
