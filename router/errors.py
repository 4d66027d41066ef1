"""HTTP errors in the API's own shape (OpenAI's, or Anthropic's on its routes), rendered
one way whichever layer of the router raises them."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import Send

from protocol.errors import Dialect, ErrorKind, error_body, error_status

# Seconds a client should wait before retrying, by status: derived from the error's
# kind, so no call site has to remember it.
RETRY_AFTER_S = {429: 1, 503: 5, 529: 5}


class HTTPError(Exception):
    """Raised inside a handler; rendered as the error body with the kind's status."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after = retry_after

    async def send(self, send: Send, dialect: Dialect = Dialect.OPENAI) -> None:
        await send_error(send, self.kind, self.message, self.param, self.retry_after, dialect)


def _headers(status: int, length: int, retry_after: int | None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(length).encode())]
    if retry_after is None:
        retry_after = RETRY_AFTER_S.get(status)
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, retry_after)).encode()))
    return headers


async def send_error(send: Send, kind: ErrorKind, message: str, param: str | None = None,
                     retry_after: int | None = None, dialect: Dialect = Dialect.OPENAI,
                     sizes: tuple[int, int] | None = None) -> None:
    """The error as raw ASGI messages (pure-ASGI code paths). `retry_after` overrides the
    status's default when the caller knows better (a backoff that ends at a known time)."""
    body = error_body(kind, message, param, dialect, sizes)
    status = error_status(kind, dialect)
    await send({"type": "http.response.start", "status": status,
                "headers": _headers(status, len(body), retry_after)})
    await send({"type": "http.response.body", "body": body})


def error_response(kind: ErrorKind, message: str, param: str | None = None,
                   status: int | None = None, retry_after: int | None = None) -> Response:
    """The error as a Starlette response (request/response handlers)."""
    status = status or kind.status
    body = error_body(kind, message, param)
    response = Response(body, status_code=status)
    response.raw_headers = _headers(status, len(body), retry_after)
    return response
