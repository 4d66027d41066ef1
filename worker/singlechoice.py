"""A one-choice renderer (Responses, Messages) seen as the engine's choice-indexed one.

Those APIs render one answer whose events the worker writes itself; the engine speaks to
every renderer by choice index, and asks for llama-server's extras (progress, live
timings) that these APIs have no event for.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import ErrorKind
from worker.openai_api import JSON, SSE
from worker.outputs import Delta, Finish, PromptProgress, Timings


class SingleChoice:
    """A one-choice renderer (Responses, Messages) seen as the engine's choice-indexed one."""

    def __init__(self, renderer: Any, stream: bool, anthropic: bool = False) -> None:
        self._r = renderer
        self._stream = stream
        self._anthropic = anthropic
        self.content_type = SSE if stream else JSON
        self._deltas: list[Delta] = []

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        if not self._stream:
            return b""
        out: bytes = (self._r.start(prompt_tokens, cached_tokens) if self._anthropic else self._r.start())
        return out

    def progress(self, p: PromptProgress, t: Timings | None) -> bytes:
        return b""  # these APIs have no event for it (llama-server's return_progress is its own)

    def live(self, choice: int, t: Timings) -> None:
        pass

    def delta(self, choice: int, d: Delta) -> bytes:
        if not self._stream:
            self._deltas.append(d)
            return b""
        out: bytes = self._r.delta(d)
        return out

    def finish(self, choice: int, f: Finish) -> bytes:
        if not self._stream:
            if self._anthropic:
                self._r.start(f.usage.prompt_tokens, f.usage.cached_tokens)
            self._body: bytes = self._r.body(self._deltas, f)
            return b""
        out: bytes = self._r.finish(f)
        return out

    def end(self) -> bytes:
        return b"" if self._stream else self._body

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        out: bytes = self._r.fail(kind, message)
        return out
