"""Anthropic's Messages API JSON, as msgspec Structs: the request (and count_tokens) bodies,
the Message object, the stream events and the error body (worker.messages_api maps them).

Request Structs ignore unknown fields (cache_control, citations, ...). Output Structs carry
every field the official `anthropic` client's types require, in Anthropic's key order.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# ---------------------------------------------------------------- request


class _Block(msgspec.Struct, tag_field="type"):
    """A content block of a message."""


class TextBlock(_Block, tag="text"):
    text: str


# Decoded only so that they are refused by name (UNSUPPORTED) rather than as unknown types.
class ImageBlock(_Block, tag="image"):
    pass


class DocumentBlock(_Block, tag="document"):
    pass


class ToolUseBlock(_Block, tag="tool_use", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


ResultBlock = TextBlock | ImageBlock | DocumentBlock


class ToolResultBlock(_Block, tag="tool_result", kw_only=True):
    tool_use_id: str
    content: str | list[ResultBlock] = ""
    is_error: bool = False


class ThinkingBlock(_Block, tag="thinking", kw_only=True):
    thinking: str
    signature: str = ""  # Anthropic requires it; its value means nothing here


class RedactedThinkingBlock(_Block, tag="redacted_thinking"):
    data: str = ""


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock \
    | RedactedThinkingBlock


class MessageParam(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[Block]


class ToolDef(msgspec.Struct, kw_only=True):
    """A tool the client defines. Anthropic's own server tools (web_search_..., bash_...)
    have another `type` and no input_schema: they are refused by type."""

    name: str
    type: str = "custom"
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    strict: bool | None = None


class _Choice(msgspec.Struct, tag_field="type", kw_only=True):
    pass


class ChoiceAuto(_Choice, tag="auto"):
    disable_parallel_tool_use: bool = False


class ChoiceAny(_Choice, tag="any"):
    disable_parallel_tool_use: bool = False


class ChoiceTool(_Choice, tag="tool"):
    name: str
    disable_parallel_tool_use: bool = False


class ChoiceNone(_Choice, tag="none"):
    pass


ToolChoiceParam = ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone

Display = Literal["summarized", "omitted"]


class ThinkingEnabled(msgspec.Struct, tag_field="type", tag="enabled", kw_only=True):
    budget_tokens: int
    display: Display | None = None


class ThinkingDisabled(msgspec.Struct, tag_field="type", tag="disabled"):
    pass


class ThinkingAdaptive(msgspec.Struct, tag_field="type", tag="adaptive", kw_only=True):
    display: Display | None = None


class ThinkingBetweenTools(msgspec.Struct, tag_field="type", tag="between_tools"):
    pass


Thinking = ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive | ThinkingBetweenTools


class JsonOutputFormat(msgspec.Struct):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(msgspec.Struct, kw_only=True):
    format: JsonOutputFormat | None = None
    effort: str | None = None  # accepted; a local model has one effort


class Metadata(msgspec.Struct):
    user_id: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """`POST /v1/messages/count_tokens`: a Messages request without max_tokens."""

    model: str
    messages: Annotated[list[MessageParam], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    mcp_servers: list[Any] | None = None  # refused: this server connects to no MCP server


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1)]
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None  # Anthropic's range is 0..1
    top_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stream: bool | None = None
    metadata: Metadata | None = None


# ---------------------------------------------------------------- Message object


class TextOut(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ThinkingOut(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str


class ToolUseOut(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


ContentOut = TextOut | ThinkingOut | ToolUseOut


class UsageOut(msgspec.Struct):
    input_tokens: int  # prompt tokens not read from the cache (Anthropic's meaning)
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class MessageOut(msgspec.Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[ContentOut]
    stop_reason: str | None
    stop_sequence: str | None
    usage: UsageOut


class CountOut(msgspec.Struct):
    input_tokens: int


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


# ---------------------------------------------------------------- stream events


class Event(msgspec.Struct, tag_field="type"):
    pass


class MessageStart(Event, tag="message_start"):
    message: MessageOut


class Ping(Event, tag="ping"):
    pass


class BlockStart(Event, tag="content_block_start"):
    index: int
    content_block: ContentOut


class TextDelta(msgspec.Struct, tag_field="type", tag="text_delta"):
    text: str


class ThinkingDelta(msgspec.Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class SignatureDelta(msgspec.Struct, tag_field="type", tag="signature_delta"):
    signature: str


class InputJsonDelta(msgspec.Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class BlockDelta(Event, tag="content_block_delta"):
    index: int
    delta: TextDelta | ThinkingDelta | SignatureDelta | InputJsonDelta


class BlockStop(Event, tag="content_block_stop"):
    index: int


class StopOut(msgspec.Struct):
    stop_reason: str
    stop_sequence: str | None


class MessageDelta(Event, tag="message_delta"):
    delta: StopOut
    usage: UsageOut  # cumulative: the client overwrites its counts with these


class MessageStop(Event, tag="message_stop"):
    pass


class ErrorEvent(Event, tag="error"):
    """The error body, both as an HTTP answer and as an `event: error` in a stream."""

    error: ErrorDetail
