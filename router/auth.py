"""API-key check as pure ASGI middleware.

The key a request came with also names who owns what it starts (a resumable
stream): routes read `owner(scope)`, a digest, never the key itself.
"""

from __future__ import annotations

import hashlib
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
        self._owners = [hashlib.sha256(k).hexdigest()[:16] for k in self._keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        match = self._match(_presented_key(scope))
        if match is not None:
            scope.setdefault("state", {})[_OWNER] = self._owners[match]
            await self.app(scope, receive, send)
            return
        await send_error(send, ErrorKind.AUTHENTICATION,
                         "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key'")

    def _match(self, presented: bytes | None) -> int | None:
        """The index of the presented key, or None."""
        if presented is None:
            return None
        # Compare against every key, without stopping early, in constant time each.
        match = None
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(key, presented):
                match = i
        return match


_OWNER = "modelherd.owner"


def owner(scope: Scope) -> str:
    """Who the request acts for: a digest of its API key, or "" when keys are off."""
    state = scope.get("state") or {}
    return str(state.get(_OWNER, ""))


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token:
                return bytes(token.strip())
        elif name == b"x-api-key" and value:
            return bytes(value).strip()
    return None
