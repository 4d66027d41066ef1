"""The interface every inference backend implements, and the values it trades in.

The engine and the renderer only see these types; which library does the
work (llama-cpp-python or mlx-lm) is the backend's business. A backend that
cannot do something a request asks for (embeddings, grammars) raises
`RequestInvalid` with `ErrorKind.UNSUPPORTED`, naming the feature.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.messages import ModelInfo, WorkerConfig

# Called with (stage, value in 0..1); returning False asks the backend to abort the load.
ProgressFn = Callable[[str, float], bool]


@dataclass(frozen=True)
class GenParams:
    """Sampling settings, already validated and defaulted."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    json_object: bool = False


@dataclass(frozen=True)
class Finish:
    """Last item of every generation: why it stopped and what it cost."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache was reused from an earlier request


# A generation yields text pieces (one per sampled token, UTF-8 permitting) then a Finish.
Generation = Generator["str | Finish", None, None]


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class Backend(Protocol):
    """Called from two threads: `load` and `close` on the worker's socket thread, the
    rest on the engine thread, one call at a time. `cancel` is checked between tokens."""

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo: ...

    def chat(self, messages: list[dict[str, str]], params: GenParams,
             cancel: threading.Event) -> Generation: ...

    def complete(self, prompt: str, params: GenParams, cancel: threading.Event) -> Generation: ...

    def embed(self, inputs: list[str]) -> Embeddings: ...

    def tokenize(self, text: str) -> list[int]: ...

    def close(self) -> None: ...
