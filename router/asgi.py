"""Raw ASGI plumbing shared by the routes: read a body within a limit, decode it into a
typed struct, answer JSON or start an event stream. No route logic lives here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind, param_of
from router.errors import HTTPError

SSE = "text/event-stream"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

T = TypeVar("T")
_json = msgspec.json.Encoder()


class ClientGone(Exception):
    """The client disconnected before its request body was whole."""


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, or HTTPError 413 past `limit` bytes (checked on Content-Length first)."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise HTTPError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def decode(body: bytes, kind: type[T], what: str = "request") -> T:
    """`body` as `kind`, or HTTPError 400 naming the field that is wrong."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`"):
            raise HTTPError(ErrorKind.INVALID_REQUEST, f"{what} body must be a JSON object") from exc
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"invalid {what}: {text}", param_of(text)) from exc
    except msgspec.DecodeError as exc:
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:  # msgspec recurses per level: 1,000 nested arrays exhaust it
        raise HTTPError(ErrorKind.INVALID_REQUEST, "malformed JSON body: nested too deeply") from exc


def encode(value: Any) -> bytes:
    return _json.encode(value)


def json_response(value: Any, status: int = 200) -> Response:
    """A typed value (a msgspec struct, or a list of them) as a JSON response."""
    return Response(_json.encode(value), status_code=status, media_type="application/json")


async def send_json(send: Send, value: Any, status: int = 200) -> None:
    body = _json.encode(value)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RawEndpoint:
    """A pure ASGI endpoint for a Route (Starlette runs a plain function or a bound
    method as request -> response)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
