"""API-key check as pure ASGI middleware."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.errors import ErrorKind
from router.errors import send_error

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Every route but /health needs `Authorization: Bearer KEY` or `x-api-key: KEY`."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self._valid(_presented_key(scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, ErrorKind.AUTHENTICATION,
                         "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'")

    def _valid(self, presented: bytes | None) -> bool:
        if presented is None:
            return False
        # Compare against every key, without stopping early, in constant time each.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, presented)
        return ok


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token:
                return bytes(token.strip())
        elif name == b"x-api-key" and value:
            return bytes(value).strip()
    return None
