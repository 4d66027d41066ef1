"""Error kinds shared by router and worker, and the OpenAI-shaped error body.

A worker reports *what* went wrong as an `ErrorKind`; the HTTP status and the
OpenAI `type` string are derived here so both processes agree on them.
"""

from __future__ import annotations

import enum

import msgspec


class ErrorKind(enum.Enum):
    """What went wrong, independent of transport. Values are stable wire strings."""

    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    UNSUPPORTED = "unsupported"
    AUTHENTICATION = "authentication"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"  # the model's state forbids it now (e.g. deleting a loaded model's files)
    MODEL_NOT_LOADED = "model_not_loaded"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    WORKER_FAILED = "worker_failed"
    LOAD_FAILED = "load_failed"
    CANCELLED = "cancelled"
    INTERNAL = "internal"

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def openai_type(self) -> str:
        return _OPENAI_TYPE[self]


_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorKind.UNSUPPORTED: 400,
    ErrorKind.MODEL_NOT_LOADED: 400,
    ErrorKind.CANCELLED: 400,
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.INTERNAL: 500,
    ErrorKind.WORKER_FAILED: 502,
    ErrorKind.LOAD_FAILED: 503,
    ErrorKind.UNAVAILABLE: 503,
}

# OpenAI's `error.type` vocabulary; clients switch on these.
_OPENAI_TYPE: dict[ErrorKind, str] = {
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorKind.UNSUPPORTED: "invalid_request_error",
    ErrorKind.MODEL_NOT_LOADED: "invalid_request_error",
    ErrorKind.CANCELLED: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.CONFLICT: "invalid_request_error",
    ErrorKind.TOO_LARGE: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.INTERNAL: "server_error",
    ErrorKind.WORKER_FAILED: "server_error",
    ErrorKind.LOAD_FAILED: "server_error",
    ErrorKind.UNAVAILABLE: "server_error",
}


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_json = msgspec.json.Encoder()


def error_body(kind: ErrorKind, message: str, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error: {"error": {"message", "type", "code", "param"}}."""
    return _json.encode(_ErrorBody(_ErrorDetail(message, kind.openai_type, kind.value, param)))


def param_of(message: str) -> str | None:
    """The top-level field a msgspec validation error points at ("... - at `$.temperature`")."""
    marker = "at `$."
    at = message.rfind(marker)
    if at < 0:
        return None
    return message[at + len(marker):].rstrip("`").split("[")[0].split(".")[0] or None


def sse_error_event(kind: ErrorKind, message: str) -> bytes:
    """An error delivered inside an already-started SSE stream (status is already 200)."""
    return b"data: " + error_body(kind, message) + b"\n\n"
