"""OpenAI request bodies, validated in full in the worker.

The router only peeks at `model` and `stream`; everything else is checked here,
against the model that will serve the request. Validation failures become a
400 whose message names the offending field (msgspec reports `$.path`).
Unknown fields are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from protocol.errors import ErrorKind, param_of

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1)]
TopK = Annotated[int, Meta(ge=0)]
Stop = str | Annotated[list[str], Meta(max_length=16)]


class RequestInvalid(Exception):
    """The body is not a request this worker can serve; maps to an HTTP error."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INVALID_REQUEST,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class JsonSchemaSpec(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema: dict[str, Any] | None = None  # llama-cpp-python's spelling for json_object


class Sampling(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    seed: int | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    grammar: str | None = None
    n: Annotated[int, Meta(ge=1)] = 1
    logprobs: bool | int | None = None
    top_logprobs: int | None = None


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | Annotated[list[str], Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None


def parse(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode and validate `body` as `kind`, or raise RequestInvalid naming the field."""
    try:
        req = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise RequestInvalid(f"invalid request: {exc}", param=param_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"malformed JSON body: {exc}") from exc
    _check_semantics(req)
    return req


def _check_semantics(req: Any) -> None:
    if isinstance(req, Sampling) and req.n != 1:
        raise RequestInvalid("n > 1 is not supported: send one request per choice",
                             kind=ErrorKind.UNSUPPORTED, param="n")
    if isinstance(req, ChatRequest):
        fmt = req.response_format
        if fmt and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema is None):
            raise RequestInvalid("response_format.json_schema.schema is required for type json_schema",
                                 param="response_format")
    if isinstance(req, Sampling) and (req.logprobs or req.top_logprobs):
        raise RequestInvalid("logprobs are not supported yet", kind=ErrorKind.UNSUPPORTED,
                             param="logprobs")
    if isinstance(req, CompletionRequest) and req.echo:
        raise RequestInvalid("echo is not supported", kind=ErrorKind.UNSUPPORTED, param="echo")
    if isinstance(req, CompletionRequest) and req.suffix:
        raise RequestInvalid("suffix (fill-in-the-middle) is not supported",
                             kind=ErrorKind.UNSUPPORTED, param="suffix")
    if isinstance(req, EmbeddingRequest) and req.dimensions is not None:
        raise RequestInvalid("dimensions is not supported: the model's embedding size is fixed",
                             kind=ErrorKind.UNSUPPORTED, param="dimensions")


def message_text(msg: Message) -> str:
    """Flatten OpenAI content parts to text; non-text parts are refused."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for part in msg.content:
        if part.type != "text" or part.text is None:
            raise RequestInvalid(f"content part type {part.type!r} is not supported by this model",
                                 kind=ErrorKind.UNSUPPORTED, param="messages")
        texts.append(part.text)
    return "".join(texts)
