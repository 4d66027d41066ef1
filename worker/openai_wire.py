"""The JSON of OpenAI's chat and text completions and embeddings as this server writes it,
as msgspec Structs, with llama-server's additions (`timings`, `reasoning_content`).
Field order follows OpenAI's; `UNSET` fields are left out."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class TopLogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    id: int | UnsetType = UNSET  # llama-server's native output only


class LogprobOut(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprobOut]
    id: int | UnsetType = UNSET


class ChatLogprobs(msgspec.Struct):
    content: list[LogprobOut]
    refusal: None = None


class CompletionLogprobs(msgspec.Struct):
    """The legacy completions shape: parallel lists."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionOut(msgspec.Struct, omit_defaults=True):
    name: str | UnsetType = UNSET
    arguments: str = ""


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionOut
    type: str = "function"


class ToolCallDelta(msgspec.Struct):
    index: int
    function: FunctionOut
    id: str | UnsetType = UNSET
    type: str | UnsetType = UNSET


class ChatMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


class ChatDelta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    reasoning_content: str | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class PromptDetails(msgspec.Struct):
    cached_tokens: int


class CompletionDetails(msgspec.Struct):
    reasoning_tokens: int


class UsageOut(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptDetails
    completion_tokens_details: CompletionDetails


class TimingsOut(msgspec.Struct):
    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageOut
    timings: TimingsOut | UnsetType = UNSET
    object: str = "chat.completion"


class PromptProgressOut(msgspec.Struct):
    total: int
    cache: int
    processed: int
    time_ms: int


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: UsageOut | UnsetType | None = UNSET
    timings: TimingsOut | UnsetType = UNSET
    prompt_progress: PromptProgressOut | UnsetType = UNSET


class TextCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[TextChoice]
    object: str = "text_completion"
    usage: UsageOut | UnsetType | None = UNSET
    timings: TimingsOut | UnsetType = UNSET
    prompt_progress: PromptProgressOut | UnsetType = UNSET


class EmbeddingOut(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[EmbeddingOut]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
