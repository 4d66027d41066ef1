"""What one choice of a generation produces, as the renderers see it.

The engine turns sampled tokens into text; an output parser (worker.toolcalls) splits
that text into typed pieces: visible text, reasoning, tool calls. Every API's renderer
(chat completions, completions, Responses, Messages, llama-server's native routes) turns
these pieces and the final `Finish` into the exact bytes its client receives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    id: int = -1


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token with its log-probability and the most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()
    id: int = -1


@dataclass(frozen=True)
class Text:
    """Visible text, with the log-probabilities of the tokens it came from when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Reasoning:
    """Text of the model's thinking (between <think> and </think>, or a thinking channel)."""

    text: str


@dataclass(frozen=True)
class ToolCallBegin:
    """A tool call starts: its position among this choice's calls, its id and the function."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """More of a tool call's arguments, as JSON text (the pieces join into one JSON object)."""

    index: int
    text: str


Delta = Text | Reasoning | ToolCallBegin | ToolCallArgs


@dataclass(frozen=True)
class PromptProgress:
    """How far a prompt has been read: llama-server's `prompt_progress` (return_progress)."""

    total: int  # prompt tokens
    cache: int  # of them, taken from a cache
    processed: int  # read so far, the cached ones included
    time_ms: int  # since the request took its slot


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused
    reasoning_tokens: int = 0  # of the completion tokens, those spent thinking


@dataclass(frozen=True)
class Timings:
    """llama-server's `timings`: how long the prompt and the generation took."""

    prompt_n: int  # prompt tokens evaluated (not taken from the cache)
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    cache_n: int  # prompt tokens taken from the cache

    @property
    def prompt_per_token_ms(self) -> float:
        return self.prompt_ms / self.prompt_n if self.prompt_n else 0.0

    @property
    def prompt_per_second(self) -> float:
        return 1e3 * self.prompt_n / self.prompt_ms if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_token_ms(self) -> float:
        return self.predicted_ms / self.predicted_n if self.predicted_n else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1e3 * self.predicted_n / self.predicted_ms if self.predicted_ms > 0 else 0.0


@dataclass(frozen=True)
class Finish:
    """The end of one choice: why it stopped and what it cost."""

    reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    timings: Timings
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    tool_calls: int = 0  # how many tool calls this choice made
