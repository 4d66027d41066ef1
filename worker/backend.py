"""The interface every inference backend implements, and the values it trades in.

A backend loads one model and offers two things: its tokenizer and templates (turning
a task into prompt tokens, tokens back into text), and a `Batcher`: the slots that
decode several sequences together. The engine (worker.engine) drives both and never
knows which library does the work. A backend that cannot do something a request asks
for (embeddings, grammars) raises `RequestInvalid` with `ErrorKind.UNSUPPORTED`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from protocol.messages import ModelInfo, WorkerConfig
from worker.task import Sampling, Task

# Called with (stage, value in 0..1); returning False asks the backend to abort the load.
ProgressFn = Callable[[str, float], bool]


@dataclass(frozen=True)
class Prompt:
    """A task's prompt, as the model will read it."""

    tokens: tuple[int, ...]
    text: str = ""  # the rendered template, when it came from one
    stop: tuple[str, ...] = ()  # stop strings the chat format implies
    thinking_started: bool = False  # the template opened <think> itself: output starts inside it


@dataclass(frozen=True)
class LazyGrammar:
    """A grammar applied only once the output matches one of `patterns` (regexes) or
    produces one of `tokens`: a tool call may start anywhere, or never."""

    patterns: tuple[str, ...] = ()
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class SeqSpec:
    """What a request asks of the slots: a prompt, how to sample, how many choices."""

    prompt: tuple[int, ...]
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 16  # tokens each choice may generate (within the slot's context)
    n: int = 1
    logprobs: int | None = None  # None: no log-probabilities; k: the sampled token's and k more
    grammar: str | None = None  # GBNF
    lazy: LazyGrammar | None = None
    conversation: str | None = None
    cache_prompt: bool = True


@dataclass(frozen=True)
class TokenProbs:
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first


@dataclass(frozen=True)
class Sampled:
    handle: int
    token: int
    probs: TokenProbs | None = None


@dataclass
class SeqStats:
    """How a sequence's prompt was read, for usage and timings."""

    cached: int = 0  # prompt tokens taken from a slot or the RAM cache
    evaluated: int = 0
    restored: bool = False  # the cached part came from the RAM cache
    admitted_at: float = 0.0  # perf_counter seconds
    prompt_done_at: float = 0.0
    read: int = 0  # of the evaluated tokens, how many have been decoded so far


@dataclass(frozen=True)
class SlotInfo:
    id: int
    n_ctx: int
    is_processing: bool
    n_tokens: int  # tokens its cache holds
    conversation: str | None
    handle: int | None


@dataclass(frozen=True)
class CacheInfo:
    """The host-RAM prompt cache of idle conversations."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class TokenDecoder(Protocol):
    """Turns one sequence's tokens into text as they come (a character may span tokens)."""

    def add(self, token: int) -> str: ...
    def flush(self) -> str: ...


class Batcher(Protocol):
    """Slots decoding several sequences at once (continuous batching)."""

    @property
    def parallel(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def busy(self) -> bool: ...
    def admit(self, spec: SeqSpec) -> list[int]: ...
    def step(self, paused: AbstractSet[int] = frozenset()) -> list[Sampled]: ...
    def release(self, handle: int) -> None: ...
    def stats(self, handle: int) -> SeqStats: ...
    def info(self) -> list[SlotInfo]: ...
    def cache_info(self) -> CacheInfo: ...


class Backend(Protocol):
    """Called from two threads: `load` and `close` on the worker's socket thread, the
    rest (from `warm_up` on) on the engine thread, one call at a time."""

    supports_grammar: bool  # whether SeqSpec.grammar can be applied (llama.cpp: yes; mlx-lm: no)

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo: ...
    def warm_up(self) -> None: ...
    @property
    def batcher(self) -> Batcher: ...
    @property
    def n_ctx(self) -> int: ...
    def chat_prompt(self, task: Task) -> Prompt: ...
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def piece(self, token: int) -> bytes: ...
    def token_text(self, token: int) -> str: ...
    def decoder(self) -> TokenDecoder: ...
    def special_tokens(self) -> dict[str, int]: ...
    def is_end(self, token: int) -> bool: ...
    def embed(self, inputs: Sequence[Sequence[int]], normalize: int) -> Embeddings: ...
    def close(self) -> None: ...
