"""A generation task: what a request asks of the model, whichever API it came in through.

Each API module parses its own request body (OpenAI chat and completions, the Responses
API, Anthropic's Messages, llama-server's native /completion and /infill) into a `Task`;
the engine runs tasks without knowing which API they came from, and hands what they
produce (worker.outputs) back to that API's renderer.

Conversation messages are kept in OpenAI's chat shape, the one chat templates are
written for: `role`, `content` (text), and for assistant turns `tool_calls` and
`reasoning_content`, for tool results `tool_call_id` (and `name`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.schema import RequestInvalid


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant turn made (conversation history)."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool (developer is mapped to system)
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None


@dataclass(frozen=True)
class Tool:
    """A function the model may call."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)  # a JSON Schema
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: str = "auto"  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function, when mode is "named"


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Reasoning:
    """How thinking is handled: whether the model is asked to think (None: the template's
    default), and how its thinking is returned ("auto"/"deepseek": separated out as
    reasoning; "none": left in the text)."""

    enabled: bool | None = None
    format: str = "auto"
    budget: int | None = None  # tokens of thinking at most (Anthropic's budget_tokens)


@dataclass(frozen=True)
class Task:
    """One generation: a chat (`messages`) or a raw prompt (`prompt`), and how to sample it."""

    messages: tuple[Message, ...] | None = None
    prompt: str | tuple[int, ...] | None = None  # text, or token ids
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool | None = None  # None: what the model's template can render
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1  # choices from one prompt evaluation
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: and the k most likely
    grammar: str | None = None  # GBNF
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    reasoning: Reasoning = field(default_factory=Reasoning)
    cache_prompt: bool = True  # False: evaluate the whole prompt (reproducible whatever the cache)
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    add_generation_prompt: bool = True
    # An assistant message to continue (prefill): `messages` end before it, the prompt ends
    # with its text, and the answer carries only what the model writes after it.
    prefill: str | None = None
    stream: bool = False
    return_progress: bool = False  # stream llama-server's prompt_progress while the prompt is read
    timings_per_token: bool = False  # llama-server's: `timings` on every streamed chunk
    include_usage: bool = False
    conversation: str | None = None  # X-Conversation-Id's stream key: prefer its slot


def continuation(messages: list[Message], asked: bool | str | None,
                 generation_prompt: bool) -> tuple[list[Message], str | None, bool]:
    """Whether to continue the final assistant message (prefill), as llama-server decides:
    when asked (`continue_final_message`), or unasked when the messages end with one.
    Returns the messages before it, its text, and add_generation_prompt."""
    explicit = asked is True or asked in ("content", "reasoning_content")
    last = messages[-1] if messages else None
    if not explicit:
        if last is None or last.role != "assistant":
            return messages, None, generation_prompt
        if len(messages) >= 2 and messages[-2].role == "assistant":
            raise RequestInvalid("Cannot have 2 or more assistant messages at the end of the list.",
                                 param="messages")
        generation_prompt = False
    if generation_prompt:
        raise RequestInvalid("Cannot set both add_generation_prompt and continue_final_message to true.",
                             param="continue_final_message")
    if last is None or last.role != "assistant":
        raise RequestInvalid("continue_final_message needs the messages to end with an assistant message",
                             param="continue_final_message")
    if last.tool_calls:
        raise RequestInvalid("Cannot continue an assistant message that contains tool calls.",
                             param="messages")
    return messages[:-1], last.content, True
