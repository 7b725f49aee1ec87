"""The two services' own web pages: files shipped in the packages (no CDN, nothing fetched
from outside), served from the control listeners.

A page is HTML, CSS and hand-written JS. The page files hold no data, so they are public;
the JSON they poll keeps the listener's token rule. The page reads the token once from the
URL fragment (``/#token=...``: browsers never send a fragment to the server, so it is in no
access log) or from a form, keeps it in the browser's ``localStorage`` and sends it as
``Authorization: Bearer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Final

from shared.http import App, Handler, Request, Response

# The pages load nothing from elsewhere and run no inline script.
CONTENT_SECURITY_POLICY: Final = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                  "img-src 'self' data:; connect-src 'self'; "
                                  "frame-ancestors 'none'")
_TYPES: Final = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
SHARED_ASSETS: Final = {"/static/llamanap.js": ("shared.web", "llamanap.js"),
                        "/static/llamanap.css": ("shared.web", "llamanap.css")}


def asset(package: str, name: str) -> bytes:
    """The bytes of the file ``name`` shipped in ``package`` (package data)."""
    return resources.files(package).joinpath(name).read_bytes()


def page_response(body: bytes, name: str) -> Response:
    """``body`` served as the file ``name``: its type, the policy, never cached stale."""
    kind = _TYPES[name[name.rindex("."):]]
    return Response(200, body, f"{kind}; charset=utf-8", headers=[
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("cache-control", "no-cache"), ("x-content-type-options", "nosniff")])


def _handler(body: bytes, name: str) -> Handler:
    async def handler(req: Request) -> Response:
        return page_response(body, name)
    return handler


def add_assets(app: App, files: Mapping[str, tuple[str, str]]) -> None:
    """``GET path`` for each ``path -> (package, file name)`` in ``files``, read once here."""
    for path, (package, name) in files.items():
        app.route("GET", path)(_handler(asset(package, name), name))
