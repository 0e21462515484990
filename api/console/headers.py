"""The headers every console response carries (the contract's "Console" section)."""

from __future__ import annotations

from flask import Response

#: No inline script or style anywhere (charts are SVG whose styles live in a stylesheet
#: keygate serves); nothing loaded from elsewhere; never framed; forms post only back here.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
CONSOLE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def secure(resp: Response) -> Response:
    resp.headers.update(CONSOLE_HEADERS)
    return resp
