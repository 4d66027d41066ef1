"""One choice of a generation, token by token: text, stop strings, and what the text means.

Each sampled token is decoded incrementally (UTF-8 may span tokens); text that could be
the start of a stop string is held back until the next token decides it, so a stop
string never reaches the client, even in part; what passes goes through the output
parser (reasoning and tool calls, worker.toolcalls), whose typed pieces the renderer
turns into bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from worker.backend import TokenDecoder, TokenProbs
from worker.outputs import Delta, Reasoning, Text, TokenLogprob, ToolCallBegin, TopLogprob


class OutputParser(Protocol):
    def feed(self, text: str) -> list[Delta]: ...
    def end(self) -> list[Delta]: ...


class PlainText:
    """The parser of a choice with no tools and no reasoning to separate."""

    def feed(self, text: str) -> list[Delta]:
        return [Text(text)] if text else []

    def end(self) -> list[Delta]:
        return []


def split_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, str | None]:
    """(text to emit now, text to hold back, the stop string hit if one was)."""
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    if hits:
        cut, stop = min(hits)
        return text[:cut], "", stop
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], text[len(text) - hold:], None


@dataclass
class Step:
    """What one token did to a choice."""

    deltas: list[Delta]
    stop: str | None = None  # a stop string was hit: the choice is over


class Choice:
    def __init__(self, index: int, handle: int, parser: OutputParser, stops: tuple[str, ...],
                 decoder: TokenDecoder, piece: Callable[[int], bytes], token_text: Callable[[int], str],
                 want_logprobs: bool) -> None:
        self.index = index
        self.handle = handle
        self.count = 0  # tokens generated (an end token is not counted)
        self.reasoning_tokens = 0
        self.tool_calls = 0
        self.done = False
        self._parser = parser
        self._stops = stops
        self._piece = piece
        self._token_text = token_text
        self._decoder = decoder
        self._held = ""
        self._want_logprobs = want_logprobs
        self._pending_logprobs: list[TokenLogprob] = []

    def token(self, token: int, probs: TokenProbs | None) -> Step:
        """A generated token (not an end token)."""
        self.count += 1
        if self._want_logprobs and probs is not None:
            raw = self._piece(token)
            top = tuple(TopLogprob(self._token_text(t), lp, tuple(self._piece(t)), t) for t, lp in probs.top)
            text = raw.decode("utf-8", errors="replace")
            self._pending_logprobs.append(TokenLogprob(text, probs.logprob, tuple(raw), top, token))
        text, self._held, stop = split_at_stop(self._held + self._decoder.add(token), self._stops)
        deltas = self._attach(self._parser.feed(text) if text else [])
        if deltas and all(isinstance(d, Reasoning) for d in deltas):
            self.reasoning_tokens += 1
        return Step(deltas, stop)

    def end(self, stopped: bool) -> list[Delta]:
        """The choice is over. After a stop string nothing more goes out, not even bytes the
        decoder still holds."""
        self.done = True
        text = "" if stopped else self._held + self._decoder.flush()
        self._held = ""
        deltas = (self._parser.feed(text) if text else []) + self._parser.end()
        out = self._attach(deltas)
        if self._pending_logprobs:  # tokens whose text was held back and then dropped
            out.append(Text("", tuple(self._pending_logprobs)))
            self._pending_logprobs = []
        return out

    def _attach(self, deltas: list[Delta]) -> list[Delta]:
        """Log-probabilities go with the first visible text after their tokens."""
        self.tool_calls += sum(1 for d in deltas if isinstance(d, ToolCallBegin))
        if not self._pending_logprobs:
            return deltas
        for i, d in enumerate(deltas):
            if isinstance(d, Text):
                deltas[i] = Text(d.text, tuple(self._pending_logprobs))
                self._pending_logprobs = []
                break
        return deltas
