"""API keys as pure ASGI middleware: who is calling, and whether their role may do this.

Every route but /health (and a served web app's files) needs `Authorization: Bearer KEY`
or `x-api-key: KEY` once keys are configured. The key found is put in the request's
scope: routes read `owner(scope)` (what owns the streams and stored responses it starts,
a digest, never the key) and `may_use(scope, model)` (a user key limited to some models
sees no others). Management routes and /metrics are for admin keys: a user key gets 403.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from protocol.errors import Dialect, ErrorKind
from router.errors import send_error
from router.keys import Key, Keys, Role

OPEN_PATHS = frozenset({"/health", "/v1/health"})
# (method, path): what only an admin key may do.
ADMIN_ONLY = frozenset({
    ("POST", "/models/load"), ("POST", "/models/unload"), ("POST", "/models/pull"), ("POST", "/models"),
    ("DELETE", "/models"), ("POST", "/models/prune"), ("POST", "/models/reload"),
    ("GET", "/metrics"), ("HEAD", "/metrics"),  # unless metrics_public (then it is a public path)
})
_KEY = "modelherd.key"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Keys, public: frozenset[str] = frozenset()) -> None:
        self.app = app
        self._keys = keys
        self._public = OPEN_PATHS | public  # and the files of a served web app, which hold no data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys.enabled or self._is_public(scope):
            await self.app(scope, receive, send)
            return
        dialect = Dialect.ANTHROPIC if scope["path"].startswith("/v1/messages") else Dialect.OPENAI
        presented = _presented_key(scope)
        key = self._keys.find(presented) if presented is not None else None
        if key is None:
            await send_error(send, ErrorKind.AUTHENTICATION, "invalid or missing API key: send "
                             "'Authorization: Bearer <key>' or 'x-api-key'", dialect=dialect)
            return
        if key.role is not Role.ADMIN and (scope["method"], scope["path"]) in ADMIN_ONLY:
            await send_error(send, ErrorKind.FORBIDDEN, f"{scope['method']} {scope['path']} needs an admin "
                             f"key; key {key.name!r} has the role {key.role.value!r}", dialect=dialect)
            return
        scope.setdefault("state", {})[_KEY] = key
        await self.app(scope, receive, send)

    def _is_public(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in self._public or (scope["method"] in ("GET", "HEAD") and path.startswith("/_app/")
                                        and "/_app/" in self._public)


def key_of(scope: Scope) -> Key | None:
    """The key the request came with; None when keys are off."""
    key = (scope.get("state") or {}).get(_KEY)
    return key if isinstance(key, Key) else None


def owner(scope: Scope) -> str:
    """Who the request acts for: a digest of its API key, or "" when keys are off."""
    key = key_of(scope)
    return key.owner if key is not None else ""


def key_name(scope: Scope) -> str:
    """What logs and metrics call the caller: its key's name ("-" when keys are off)."""
    key = key_of(scope)
    return key.name if key is not None else "-"


def may_use(scope: Scope, model: str) -> bool:
    """Whether the caller's key may see `model` (its own name, not an alias)."""
    key = key_of(scope)
    return key is None or key.may_use(model)


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token:
                return bytes(token.strip())
        elif name == b"x-api-key" and value:
            return bytes(value).strip()
    return None
