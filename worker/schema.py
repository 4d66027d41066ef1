"""Request bodies of the OpenAI routes and llama-server's own, validated in full in the worker.

The router only peeks at `model` and `stream`; everything else is checked here, against
the model that will serve the request. Validation failures become a 400 whose message
names the offending field (msgspec reports `$.path`). Unknown fields are ignored, as
OpenAI-compatible servers commonly do; llama-server's extra sampling fields are read.
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
                 param: str | None = None, sizes: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.sizes = sizes  # a prompt over the context: (its tokens, n_ctx)


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str = "{}"


class ToolCallParam(msgspec.Struct):
    function: FunctionCall
    id: str = ""
    type: str = "function"


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


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


class FunctionSpec(msgspec.Struct):
    name: Annotated[str, Meta(min_length=1)]
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(msgspec.Struct):
    type: str
    function: FunctionSpec | None = None


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    type: str
    function: NamedFunction | None = None


Bias = Annotated[float, Meta(ge=-100.0, le=100.0)] | bool


class Sampling(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completions (llama-server's extras included)."""

    model: str = ""
    stream: bool | None = None  # null as false: OpenAI's schema allows it
    stream_options: StreamOptions | None = None
    max_tokens: MaxTokens | None = None
    n_predict: int | None = None  # llama-server's max_tokens; -1: no limit
    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    seed: int | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: Annotated[float, Meta(gt=0.0)] | None = None
    # OpenAI's {"token id": bias}, or llama-server's: keys may be text (each of its tokens is
    # biased), a list of [token id or text, bias] pairs, and false as a bias bans the token.
    logit_bias: dict[str, Bias] | list[tuple[int | str, Bias]] | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None  # llama-server: a schema the output must follow
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    cache_prompt: bool = True
    timings_per_token: bool = False
    return_progress: bool = False
    ignore_eos: bool = False  # llama-server's: the end-of-generation tokens are banned


class ChatRequest(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: what the model's template can render
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: bool | None = None  # a plain switch for thinking models
    reasoning_effort: str | None = None
    add_generation_prompt: bool = True
    # vLLM's and llama-server's: continue the final assistant message instead of answering
    # it (true, "content" or "reasoning_content"; llama-server also does so unasked).
    continue_final_message: bool | str | None = None


class CompletionRequest(Sampling, kw_only=True):
    # Text, token ids, or a list of one text (msgspec takes one list type in a union: the
    # items are checked in openai_api.completion_task).
    prompt: str | Annotated[list[int | str], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool | None = None
    suffix: str | None = None


class NativeCompletionRequest(Sampling, kw_only=True):
    """llama-server's /completion: `prompt` as text or tokens, `n_probs`, native output."""

    prompt: str | list[int | str] = ""
    n_probs: Annotated[int, Meta(ge=0, le=100)] = 0
    logprobs: Annotated[int, Meta(ge=0, le=100)] | None = None  # alias of n_probs
    post_sampling_probs: bool = False
    return_tokens: bool = False


class InfillExtra(msgspec.Struct):
    text: str
    filename: str = ""


class InfillRequest(NativeCompletionRequest, kw_only=True):
    input_prefix: str
    input_suffix: str
    input_extra: list[InfillExtra] = []


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    # Text, texts, token ids or lists of token ids (msgspec takes one list type in a union:
    # the items are checked in worker.endpoints).
    input: str | Annotated[list[Any], Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    embd_normalize: int = 2  # llama-server: 2 Euclidean (L2), -1 none, 0 max-abs, 1 taxicab, p


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    content: str | list[int | str] = ""
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    tokens: list[int] = []


def parse(body: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode and validate `body` as `kind`, or raise RequestInvalid naming the field."""
    try:
        req = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise RequestInvalid(f"invalid request: {exc}", param=param_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:
        raise RequestInvalid("malformed JSON body: nested too deeply") from exc
    _check_semantics(req)
    return req


def _check_semantics(req: Any) -> None:
    if isinstance(req, ChatRequest):
        fmt = req.response_format
        if fmt and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema is None):
            raise RequestInvalid("response_format.json_schema.schema is required for type json_schema",
                                 param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs: true", param="top_logprobs")
    if isinstance(req, CompletionRequest) and req.echo:
        raise RequestInvalid("echo is not supported", kind=ErrorKind.UNSUPPORTED, param="echo")
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
