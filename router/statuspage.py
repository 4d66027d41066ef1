"""The status page: a small static page (router/static, no build step) that shows every
model live, and GET /whoami, which tells it what the key it holds may do.

The page is at `/`, or at `/status` when a web app (`ui_dir`) has `/`; `/status` always
works. Its files hold no data and need no key; its data calls do (when keys are on): the
page asks for the key once, keeps it in the browser's localStorage and sends it as a
header, reading /models/sse with fetch() rather than EventSource, which cannot send one.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router.asgi import json_response
from router.auth import key_of
from router.keys import Keys, Role
from router.schema import Caller

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = "/_modelherd/"  # a prefix no web app served at / is likely to use
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
# Only its own files, and fetch() to this origin: a model name can never become markup or script.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _file(name: str) -> Response:
    path = STATIC / name
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = _CSP
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=headers)


def routes(keys: Keys, at_root: bool) -> tuple[list[Route], frozenset[str]]:
    """The page's routes, and the paths among them that need no key."""

    async def page(request: Request) -> Response:
        return _file("status.html")

    async def asset(request: Request) -> Response:
        return _file(request.url.path.removeprefix(ASSETS))

    async def whoami(request: Request) -> Response:
        """The caller's key name and role; with keys off, anyone may do anything (an admin)."""
        key = key_of(request.scope)
        if key is None:
            return json_response(Caller(None, Role.ADMIN.value, keys.enabled))
        return json_response(Caller(key.name, key.role.value, keys.enabled))

    assets = [f"{ASSETS}{name}" for name in ("status.js", "status.css")]
    out = [Route("/status", page, methods=["GET"]), Route("/whoami", whoami, methods=["GET"]),
           *[Route(path, asset, methods=["GET"]) for path in assets]]
    public = {"/status", *assets}
    if at_root:
        out.append(Route("/", page, methods=["GET"]))
        public.add("/")
    return out, frozenset(public)
