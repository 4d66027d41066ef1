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
    FORBIDDEN = "forbidden"  # the key is valid, its role may not do this
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
    ErrorKind.FORBIDDEN: 403,
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
    # llama-server's type: its web UI and clients read n_prompt_tokens/n_ctx beside it.
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: "exceed_context_size_error",
    ErrorKind.UNSUPPORTED: "invalid_request_error",
    ErrorKind.MODEL_NOT_LOADED: "invalid_request_error",
    ErrorKind.CANCELLED: "invalid_request_error",
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.FORBIDDEN: "permission_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.CONFLICT: "invalid_request_error",
    ErrorKind.TOO_LARGE: "invalid_request_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.INTERNAL: "server_error",
    ErrorKind.WORKER_FAILED: "server_error",
    ErrorKind.LOAD_FAILED: "server_error",
    ErrorKind.UNAVAILABLE: "server_error",
}


class Dialect(enum.Enum):
    """Whose error shape a route answers in."""

    OPENAI = "openai"  # and llama-server's, which is the same envelope
    ANTHROPIC = "anthropic"


# Anthropic's error.type and status per kind; its SDK keys its exception classes on both.
# A model that is busy or being swapped is its "overloaded" (529), which clients retry.
_ANTHROPIC: dict[ErrorKind, tuple[str, int]] = {
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", 400),
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: ("invalid_request_error", 400),
    ErrorKind.UNSUPPORTED: ("invalid_request_error", 400),
    ErrorKind.MODEL_NOT_LOADED: ("invalid_request_error", 400),
    ErrorKind.CANCELLED: ("invalid_request_error", 400),
    ErrorKind.CONFLICT: ("invalid_request_error", 409),
    ErrorKind.AUTHENTICATION: ("authentication_error", 401),
    ErrorKind.FORBIDDEN: ("permission_error", 403),
    ErrorKind.NOT_FOUND: ("not_found_error", 404),
    ErrorKind.TOO_LARGE: ("request_too_large", 413),
    ErrorKind.RATE_LIMITED: ("rate_limit_error", 429),
    ErrorKind.INTERNAL: ("api_error", 500),
    ErrorKind.WORKER_FAILED: ("api_error", 500),
    ErrorKind.LOAD_FAILED: ("api_error", 500),
    ErrorKind.UNAVAILABLE: ("overloaded_error", 529),
}


def error_status(kind: ErrorKind, dialect: Dialect = Dialect.OPENAI) -> int:
    return _ANTHROPIC[kind][1] if dialect is Dialect.ANTHROPIC else kind.status


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: str | None = None
    # exceed_context_size_error (llama-server): the prompt's size and the context's.
    n_prompt_tokens: int | msgspec.UnsetType = msgspec.UNSET
    n_ctx: int | msgspec.UnsetType = msgspec.UNSET


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


class _AnthropicDetail(msgspec.Struct):
    type: str
    message: str


class _AnthropicBody(msgspec.Struct):
    type: str  # "error", first, as Anthropic writes it
    error: _AnthropicDetail


_json = msgspec.json.Encoder()


def error_body(kind: ErrorKind, message: str, param: str | None = None,
               dialect: Dialect = Dialect.OPENAI, sizes: tuple[int, int] | None = None) -> bytes:
    """The JSON bytes of an error: OpenAI's {"error": {"message", "type", "code", "param"}}, or
    Anthropic's {"type": "error", "error": {"type", "message"}}. `sizes`: (prompt tokens, n_ctx)
    of a prompt over the context."""
    if dialect is Dialect.ANTHROPIC:
        return _json.encode(_AnthropicBody("error", _AnthropicDetail(_ANTHROPIC[kind][0], message)))
    detail = _ErrorDetail(message, kind.openai_type, kind.value, param)
    if sizes is not None:
        detail.n_prompt_tokens, detail.n_ctx = sizes
    return _json.encode(_ErrorBody(detail))


def param_of(message: str) -> str | None:
    """The top-level field a msgspec validation error points at ("... - at `$.temperature`")."""
    marker = "at `$."
    at = message.rfind(marker)
    if at < 0:
        return None
    return message[at + len(marker):].rstrip("`").split("[")[0].split(".")[0] or None


def sse_error_event(kind: ErrorKind, message: str, dialect: Dialect = Dialect.OPENAI) -> bytes:
    """An error delivered inside an already-started SSE stream (status is already 200)."""
    if dialect is Dialect.ANTHROPIC:  # the SDK raises on an `event: error`
        return b"event: error\ndata: " + error_body(kind, message, None, dialect) + b"\n\n"
    return b"data: " + error_body(kind, message) + b"\n\n"
