"""OpenAI's Responses API: the bytes of the answer, rendered from what the generation
produces (worker.outputs).

`ResponsesRenderer` is fed incrementally (start, delta..., finish) and returns the exact
SSE bytes of each step, in OpenAI's event order with `sequence_number` counting from 0;
`body` gives the non-streamed Response object, which is also what GET /v1/responses/{id}
returns (`response_bytes` after a streamed finish).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from msgspec.structs import replace as struct_replace

from protocol.errors import ErrorKind
from worker import responses_wire as w
from worker.outputs import Delta, Finish, Reasoning, Text, ToolCallBegin
from worker.responses_api import ResponsesOptions

_json = msgspec.json.Encoder()


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(24)  # OpenAI's ids: a prefix and 48 hex digits


# response.failed's error.code takes values from a fixed list (openai's ResponseError).
_FAILED_CODE = {
    ErrorKind.RATE_LIMITED: "rate_limit_exceeded",
    ErrorKind.INVALID_REQUEST: "invalid_prompt",
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: "invalid_prompt",
    ErrorKind.UNSUPPORTED: "invalid_prompt",
}


@dataclass
class _Open:
    """The output item being streamed: at most one is open at a time."""

    kind: str  # "message" | "reasoning" | "function_call"
    id: str
    index: int  # its output_index
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    tool_index: int = -1


class ResponsesRenderer:
    """The bytes of one Response, streamed (start, delta..., finish) or whole (body)."""

    def __init__(self, model: str, options: ResponsesOptions, *, response_id: str | None = None,
                 created_at: int | None = None) -> None:
        self.id = response_id or _new_id("resp_")
        self._sse = True
        self._seq = 0
        self._output: list[w.OutputItem] = []
        self._open: _Open | None = None
        self._final: w.ResponseObject | None = None
        o = options
        self._base = w.ResponseObject(
            id=self.id, created_at=int(time.time()) if created_at is None else created_at,
            status="in_progress", instructions=o.instructions, max_output_tokens=o.max_output_tokens,
            max_tool_calls=o.max_tool_calls, model=model, output=[],
            parallel_tool_calls=o.parallel_tool_calls,
            previous_response_id=o.previous_response_id, prompt_cache_key=o.prompt_cache_key,
            reasoning=o.reasoning, safety_identifier=o.safety_identifier, store=o.store,
            temperature=o.temperature, text=o.text, tool_choice=o.tool_choice, tools=o.tools, top_p=o.top_p,
            truncation=o.truncation, user=o.user, metadata=o.metadata)

    def _emit(self, event: w.Event) -> bytes:
        event.sequence_number = self._seq
        self._seq += 1
        if not self._sse:
            return b""
        tag = type(event).__struct_config__.tag
        return b"event: " + str(tag).encode() + b"\ndata: " + _json.encode(event) + b"\n\n"

    def start(self) -> bytes:
        """response.created and response.in_progress."""
        return (self._emit(w.Created(0, self._base))
                + self._emit(w.InProgress(0, self._base)))

    def delta(self, d: Delta) -> bytes:
        if isinstance(d, Text):
            return self._append("message", d.text, w.TextDelta) if d.text else b""
        if isinstance(d, Reasoning):
            return self._append("reasoning", d.text, w.ReasoningDelta) if d.text else b""
        if isinstance(d, ToolCallBegin):
            return self._close("completed") + self._open_call(d)
        op = self._open
        if op is None or op.kind != "function_call" or op.tool_index != d.index:
            raise ValueError(f"arguments of tool call {d.index}, which is not the open output item")
        if not d.text:
            return b""
        op.parts.append(d.text)
        return self._emit(w.ArgumentsDelta(0, op.id, op.index, d.text))

    def _append(self, kind: str, text: str, event: type[w.TextDelta] | type[w.ReasoningDelta]) -> bytes:
        out = b""
        op = self._open
        if op is None or op.kind != kind:
            out = self._close("completed")
            op = self._open = _Open(kind, _new_id("msg_" if kind == "message" else "rs_"), len(self._output))
            item: w.OutputItem
            part: w.OutputTextOut | w.ReasoningTextOut
            if kind == "message":
                item, part = w.MessageOut(id=op.id, status="in_progress", content=[]), w.OutputTextOut("")
            else:
                item = w.ReasoningOut(id=op.id, content=[], status="in_progress")
                part = w.ReasoningTextOut("")
            out += self._emit(w.ItemAdded(0, op.index, item))
            out += self._emit(w.PartAdded(0, op.id, op.index, 0, part))
        op.parts.append(text)
        return out + self._emit(event(0, op.id, op.index, 0, text))

    def _open_call(self, d: ToolCallBegin) -> bytes:
        call_id = d.id or _new_id("call_")
        op = self._open = _Open("function_call", "fc_" + call_id.removeprefix("call_"), len(self._output),
                                call_id=call_id, name=d.name, tool_index=d.index)
        item = w.FunctionCallOut(id=op.id, call_id=call_id, name=d.name, arguments="", status="in_progress")
        return self._emit(w.ItemAdded(0, op.index, item))

    def _close(self, status: str) -> bytes:
        """The done events of the open item; `status` is "incomplete" when it was cut short."""
        op, self._open = self._open, None
        if op is None:
            return b""
        text = "".join(op.parts)
        out: bytes
        item: w.OutputItem
        if op.kind == "function_call":
            out = self._emit(w.ArgumentsDone(0, op.id, op.index, text))
            item = w.FunctionCallOut(id=op.id, call_id=op.call_id, name=op.name, arguments=text,
                                     status=status)
        elif op.kind == "message":
            part = w.OutputTextOut(text)
            out = self._emit(w.TextDone(0, op.id, op.index, 0, text)) + self._emit(
                w.PartDone(0, op.id, op.index, 0, part))
            item = w.MessageOut(id=op.id, status=status, content=[part])
        else:
            rpart = w.ReasoningTextOut(text)
            out = self._emit(w.ReasoningDone(0, op.id, op.index, 0, text)) + self._emit(
                w.PartDone(0, op.id, op.index, 0, rpart))
            item = w.ReasoningOut(id=op.id, content=[rpart], status=status)
        self._output.append(item)
        return out + self._emit(w.ItemDone(0, op.index, item))

    def finish(self, f: Finish) -> bytes:
        """Closes the open item, then response.completed (response.incomplete when the
        token limit cut it short)."""
        u = f.usage
        usage = w.UsageOut(u.prompt_tokens, w.InputTokensDetails(u.cached_tokens), u.completion_tokens,
                           w.OutputTokensDetails(u.reasoning_tokens), u.prompt_tokens + u.completion_tokens)
        if f.reason == "length":
            out = self._close("incomplete")
            self._final = struct_replace(self._base, status="incomplete", output=list(self._output),
                                         incomplete_details=w.IncompleteDetails("max_output_tokens"),
                                         usage=usage)
            return out + self._emit(w.Incomplete(0, self._final))
        out = self._close("completed")
        self._final = struct_replace(self._base, status="completed", completed_at=int(time.time()),
                                     output=list(self._output), usage=usage)
        return out + self._emit(w.Completed(0, self._final))

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        """response.failed, for an error after the stream started (before, send an HTTP error)."""
        out = self._close("incomplete")
        self._final = struct_replace(self._base, status="failed", output=list(self._output),
                                     error=w.ErrorOut(_FAILED_CODE.get(kind, "server_error"), message))
        return out + self._emit(w.Failed(0, self._final))

    def body(self, deltas: Iterable[Delta], finish: Finish) -> bytes:
        """The whole Response object, for a request that did not ask to stream."""
        self._sse = False
        self.start()
        for d in deltas:
            self.delta(d)
        self.finish(finish)
        return self.response_bytes()

    def response_bytes(self) -> bytes:
        """The final Response object (after finish or fail): what GET /v1/responses/{id} returns."""
        if self._final is None:
            raise RuntimeError("the response has not finished")
        return _json.encode(self._final)
