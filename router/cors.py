"""CORS as llama-server does it, as pure ASGI middleware placed before the key check.

A preflight (OPTIONS with Access-Control-Request-Method) is answered at once with 200 and
no body, without an API key (browsers never send one on it), whatever its origin: a
foreign origin gets no Access-Control-Allow-Origin, so the browser refuses the real
request. Other responses get Access-Control-Allow-Origin
(the request's origin, reflected) and Allow-Credentials when the origin is allowed.
Allowed origins: the configured list; by default any origin on localhost / 127.0.0.1 /
[::1] (any port), so a browser app served on this machine works and a page from
elsewhere cannot make the user's browser call the daemon; "*" allows every origin.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LOCAL = re.compile(rb"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$")
_METHODS = b"GET, POST, DELETE, OPTIONS"  # every method a route takes, as llama-server
_MAX_AGE = b"600"


class CORSMiddleware:
    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self._any = "*" in origins
        self._origins = {o.rstrip("/").encode() for o in origins if o != "*"}

    def allowed(self, origin: bytes) -> bool:
        if self._any:
            return True
        if self._origins:
            return origin in self._origins
        return bool(_LOCAL.match(origin))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        allowed = origin is not None and self.allowed(origin)
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            # Reflect the requested headers rather than "*": browsers never let "*" cover
            # Authorization, which is the header every client of this API sends.
            requested = headers.get(b"access-control-request-headers", b"*")
            answer = [(b"access-control-allow-credentials", b"true"),
                      (b"access-control-allow-methods", _METHODS),
                      (b"access-control-allow-headers", requested),
                      (b"access-control-max-age", _MAX_AGE),
                      (b"vary", b"Origin"),
                      (b"content-length", b"0")]
            if allowed and origin is not None:
                answer.insert(0, (b"access-control-allow-origin", origin))
            await send({"type": "http.response.start", "status": 200, "headers": answer})
            await send({"type": "http.response.body", "body": b""})
            return
        if origin is None or not allowed:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"access-control-allow-origin", origin),
                                      (b"access-control-allow-credentials", b"true"),
                                      (b"access-control-expose-headers", b"*"),
                                      (b"vary", b"Origin")]
            await send(message)

        await self.app(scope, receive, with_cors)
