"""OpenAI-shaped HTTP errors as raw ASGI sends, usable from any layer of the router."""

from __future__ import annotations

from starlette.types import Send

from protocol.errors import ErrorKind, error_body


class HTTPError(Exception):
    """Raised inside a handler; rendered as {"error": {...}} with the kind's status."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after = retry_after


async def send_error(send: Send, kind: ErrorKind, message: str, param: str | None = None,
                     retry_after: int | None = None, status: int | None = None) -> None:
    body = error_body(kind, message, param)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status or kind.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
