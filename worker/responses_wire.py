"""The OpenAI Responses API's JSON, as msgspec Structs: what a request may hold, and every
object and stream event this server writes (worker.responses_api does the mapping).

Request Structs ignore unknown fields, like worker.schema. Output Structs list their fields
in OpenAI's order and carry every field the official client's types require, so a strict
client validates them (tests/test_responses_api.py checks that with the `openai` types).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

# ---------------------------------------------------------------- request


class _Part(msgspec.Struct, tag_field="type"):
    """A content part of a message, a tool's output or a reasoning item."""


class InputText(_Part, tag="input_text"):
    text: str


class OutputText(_Part, tag="output_text"):
    text: str


class Refusal(_Part, tag="refusal"):
    refusal: str


class ReasoningText(_Part, tag="reasoning_text"):
    text: str


class SummaryText(_Part, tag="summary_text"):
    text: str


# Decoded only so that they are refused by name (UNSUPPORTED) rather than as unknown types.
class InputImage(_Part, tag="input_image"):
    pass


class InputFile(_Part, tag="input_file"):
    pass


class InputAudio(_Part, tag="input_audio"):
    pass


Part = InputText | OutputText | Refusal | ReasoningText | SummaryText | InputImage | InputFile | InputAudio
Content = str | list[Part]


class ItemHead(msgspec.Struct):
    """Just an input item's type: an "easy" message ({"role", "content"}) has none."""

    type: str = "message"


class MessageItem(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(msgspec.Struct, kw_only=True):
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    call_id: str
    output: Content


class ReasoningItem(msgspec.Struct, kw_only=True):
    summary: list[Part] = []
    content: list[Part] | None = None


class ToolHead(msgspec.Struct):
    type: str


class FunctionToolIn(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class AllowedTool(msgspec.Struct, kw_only=True):
    type: str
    name: str | None = None


class ToolChoiceObject(msgspec.Struct, kw_only=True):
    """Every object form of tool_choice in one Struct: the supported ones are told apart
    by `type` after decoding, so the hosted-tool forms are refused by name."""

    type: str
    name: str | None = None
    mode: Literal["auto", "required"] | None = None
    tools: list[AllowedTool] | None = None


ToolChoiceMode = Literal["none", "auto", "required"]


class FormatText(msgspec.Struct, tag_field="type", tag="text", frozen=True):
    pass


class FormatJsonSchema(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    name: str
    schema: dict[str, Any]
    description: str | UnsetType = UNSET
    strict: bool | None = None


class FormatJsonObject(msgspec.Struct, tag_field="type", tag="json_object"):
    pass


TextFormat = FormatText | FormatJsonSchema | FormatJsonObject


class TextConfig(msgspec.Struct, kw_only=True):
    """`text` in a request, echoed as is in the Response."""

    format: TextFormat = FormatText()
    verbosity: Literal["low", "medium", "high"] = "medium"


Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ReasoningConfig(msgspec.Struct, kw_only=True):
    """`reasoning` in a request, echoed as is in the Response."""

    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    model: str = ""  # none: the router sends it to the only model, as with chat
    input: str | list[msgspec.Raw] | UnsetType = UNSET
    instructions: str | None = None
    tools: list[msgspec.Raw] | None = None
    tool_choice: ToolChoiceMode | ToolChoiceObject | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_tool_calls: Annotated[int, Meta(ge=0)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    # Refused when set: features of OpenAI's platform this server does not have.
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class StoredRequest(msgspec.Struct):
    """The part of a stored request that a later previous_response_id continues from."""

    input: str | list[msgspec.Raw] = []


class StoredResponse(msgspec.Struct):
    output: list[msgspec.Raw] = []


# ---------------------------------------------------------------- response object


class OutputTextOut(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class ReasoningTextOut(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class MessageOut(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: str
    role: str = "assistant"
    content: list[OutputTextOut]


class ReasoningOut(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    id: str
    summary: list[Any] = []
    content: list[ReasoningTextOut]
    status: str


class FunctionCallOut(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


OutputItem = MessageOut | ReasoningOut | FunctionCallOut


class FunctionToolOut(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    strict: bool


class ToolChoiceFunctionOut(msgspec.Struct, tag_field="type", tag="function"):
    name: str


class ToolChoiceAllowedOut(msgspec.Struct, tag_field="type", tag="allowed_tools"):
    mode: str
    tools: list[dict[str, str]]


ToolChoiceOut = str | ToolChoiceFunctionOut | ToolChoiceAllowedOut


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int
    cache_write_tokens: int = 0  # prompt caching here is the KV cache: nothing is billed for writing


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class UsageOut(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: str


class ErrorOut(msgspec.Struct):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    status: str
    background: bool = False
    completed_at: int | None = None
    error: ErrorOut | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None
    reasoning: ReasoningConfig
    safety_identifier: str | None
    service_tier: str = "default"
    store: bool
    temperature: float | None
    text: TextConfig
    tool_choice: ToolChoiceOut
    tools: list[FunctionToolOut]
    top_logprobs: int = 0
    top_p: float | None
    truncation: str
    usage: UsageOut | None = None
    user: str | None
    metadata: dict[str, str]


class InputTokensOut(msgspec.Struct):
    object: str
    input_tokens: int


# ---------------------------------------------------------------- stream events
# The event's `type` is the Struct's tag; `sequence_number` follows it in every event.


class Event(msgspec.Struct, tag_field="type"):
    sequence_number: int


class Created(Event, tag="response.created"):
    response: ResponseObject


class InProgress(Event, tag="response.in_progress"):
    response: ResponseObject


class Completed(Event, tag="response.completed"):
    response: ResponseObject


class Incomplete(Event, tag="response.incomplete"):
    response: ResponseObject


class Failed(Event, tag="response.failed"):
    response: ResponseObject


class ItemAdded(Event, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ItemDone(Event, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class PartAdded(Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextOut | ReasoningTextOut


class PartDone(Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextOut | ReasoningTextOut


class TextDelta(Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDone(Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ReasoningDelta(Event, tag="response.reasoning_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDone(Event, tag="response.reasoning_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDelta(Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    arguments: str
