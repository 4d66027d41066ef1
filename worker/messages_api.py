"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`): the request
parsed into a `Task`, and the answer's bytes rendered from what the generation produces.

Content blocks map to OpenAI chat-shaped messages (worker.task): an assistant's `tool_use`
blocks become its tool_calls (arguments = the input as JSON text) and its `thinking` blocks
its reasoning_content; each `tool_result` becomes a "tool" message answering its
tool_use_id. Tool call ids are kept as given, so a client's own ids pair up again.

`MessagesRenderer` is fed incrementally (start, delta..., finish) and returns the exact SSE
bytes Anthropic would send for each step (named events; each block closed before the next
opens); `body` gives the non-streamed Message. Errors use Anthropic's body and types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import msgspec

from protocol.errors import Dialect, ErrorKind, error_body, error_status, param_of, sse_error_event
from worker import messages_wire as w
from worker.outputs import Delta, Finish, Reasoning, Text, ToolCallBegin
from worker.schema import RequestInvalid
from worker.task import Message, Sampling, Task, Tool, ToolCall, ToolChoice, continuation
from worker.task import Reasoning as TaskReasoning

T = TypeVar("T")

_json = msgspec.json.Encoder()
_REQUEST = msgspec.json.Decoder(w.MessagesRequest)
_COUNT_REQUEST = msgspec.json.Decoder(w.CountTokensRequest)
_ALNUM = string.ascii_letters + string.digits
# Anthropic joins a message's text blocks into one prompt; chat templates take one string.
# Blocks are separate paragraphs (Claude Code sends reminders and the prompt as separate
# blocks without trailing newlines), so they are joined with a blank line.
_BLOCK_SEPARATOR = "\n\n"
MIN_THINKING_BUDGET = 1024  # Anthropic refuses smaller budgets


@dataclass(frozen=True)
class MessagesOptions:
    """What the answer needs from its request beyond the Task."""

    model: str
    stream: bool = False
    stop_sequences: tuple[str, ...] = ()
    user_id: str | None = None
    omit_thinking: bool = False  # thinking.display "omitted": blocks keep only their signature


# ---------------------------------------------------------------- errors

def anthropic_status(kind: ErrorKind) -> int:
    return error_status(kind, Dialect.ANTHROPIC)


def anthropic_error_body(kind: ErrorKind, message: str) -> bytes:
    """{"type":"error","error":{"type","message"}}; send it with `anthropic_status(kind)`."""
    return error_body(kind, message, None, Dialect.ANTHROPIC)


def anthropic_error_event(kind: ErrorKind, message: str) -> bytes:
    """An error inside a started stream: the SDK raises on an `event: error`."""
    return sse_error_event(kind, message, Dialect.ANTHROPIC)


# ---------------------------------------------------------------- parsing


def _decode(data: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        param = param_of(text)
        missing = "missing required field `"
        if param is None and missing in text:  # a top-level field: msgspec names no path
            param = text.split(missing, 1)[1].split("`", 1)[0]
            text = f"{param}: Field required"  # Anthropic's wording
        raise RequestInvalid(text, param=param) from exc
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"malformed JSON body: {exc}") from exc


def _unsupported(message: str, param: str) -> RequestInvalid:
    return RequestInvalid(message, kind=ErrorKind.UNSUPPORTED, param=param)


def _refuse_media(block: w.Block | w.ResultBlock, at: str) -> None:
    if isinstance(block, w.ImageBlock | w.DocumentBlock):
        kind = type(block).__struct_config__.tag
        raise _unsupported(f"{at}: {kind} blocks are not supported by this model", "messages")


def _texts(blocks: Iterable[w.Block | w.ResultBlock], at: str) -> str:
    texts = []
    for block in blocks:
        _refuse_media(block, at)
        if not isinstance(block, w.TextBlock):
            raise RequestInvalid(f"{at}: only text blocks are allowed here", param="messages")
        texts.append(block.text)
    return _BLOCK_SEPARATOR.join(texts)


def _user(blocks: list[w.Block], at: str) -> list[Message]:
    """A user turn: its tool results become tool messages, its text a user message, in order."""
    out: list[Message] = []
    texts: list[str] = []
    for block in blocks:
        _refuse_media(block, at)
        if isinstance(block, w.TextBlock):
            texts.append(block.text)
        elif isinstance(block, w.ToolResultBlock):
            if texts:
                out.append(Message("user", _BLOCK_SEPARATOR.join(texts)))
                texts = []
            content = block.content if isinstance(block.content, str) else _texts(block.content, at)
            if block.is_error:
                # A chat template has no error flag: say it in the text the model reads.
                content = f"Error: {content}" if content else "Error"
            out.append(Message("tool", content, tool_call_id=block.tool_use_id))
        else:
            kind = type(block).__struct_config__.tag
            raise RequestInvalid(f"{at}: {kind} blocks are only allowed in assistant messages",
                                 param="messages")
    if texts:
        out.append(Message("user", _BLOCK_SEPARATOR.join(texts)))
    return out


def _assistant(blocks: list[w.Block], at: str) -> Message:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks:
        _refuse_media(block, at)
        if isinstance(block, w.TextBlock):
            texts.append(block.text)
        elif isinstance(block, w.ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, w.ToolUseBlock):
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
        elif isinstance(block, w.ToolResultBlock):
            raise RequestInvalid(f"{at}: tool_result blocks are only allowed in user messages",
                                 param="messages")
        # redacted_thinking is encrypted by Anthropic: nothing a local model can read.
    return Message("assistant", _BLOCK_SEPARATOR.join(texts), tool_calls=tuple(calls),
                   reasoning_content="".join(thinking) or None)


def _messages(req: w.CountTokensRequest) -> list[Message]:
    out: list[Message] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _texts(req.system, "system")
        out.append(Message("system", system))
    for i, msg in enumerate(req.messages):
        at = f"messages[{i}]"
        if isinstance(msg.content, str):
            out.append(Message(msg.role, msg.content))
        elif msg.role == "assistant":
            out.append(_assistant(msg.content, at))
        elif msg.role == "system":
            out.append(Message("system", _texts(msg.content, at)))
        else:
            out += _user(msg.content, at)
    return out


def _tools(req: w.CountTokensRequest) -> list[Tool]:
    tools = []
    for i, tool in enumerate(req.tools or ()):
        if tool.type != "custom":
            raise _unsupported(f"tools[{i}]: tool type {tool.type!r} is not supported; only custom tools "
                               "(name, description, input_schema) are", "tools")
        if tool.input_schema is None:
            raise RequestInvalid(f"tools.{i}.input_schema: Field required", param="tools")
        tools.append(Tool(tool.name, tool.description or "", tool.input_schema, bool(tool.strict)))
    return tools


def _tool_choice(choice: w.ToolChoiceParam | None, tools: list[Tool]) -> tuple[ToolChoice, bool]:
    """The Task's tool choice, and whether parallel tool calls stay allowed."""
    if choice is None:
        return ToolChoice("auto"), True
    if isinstance(choice, w.ChoiceNone):
        return ToolChoice("none"), True
    if not tools:
        raise RequestInvalid("tool_choice may only be specified while providing tools", param="tool_choice")
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, w.ChoiceAuto):
        return ToolChoice("auto"), parallel
    if isinstance(choice, w.ChoiceAny):
        return ToolChoice("required"), parallel
    if choice.name not in {t.name for t in tools}:
        raise RequestInvalid(f"tool_choice names {choice.name!r}, which is not in tools", param="tool_choice")
    return ToolChoice("named", choice.name), parallel


def _reasoning(thinking: w.Thinking | None, max_tokens: int | None) -> TaskReasoning:
    if thinking is None:
        return TaskReasoning()
    if isinstance(thinking, w.ThinkingDisabled):
        return TaskReasoning(enabled=False)
    if isinstance(thinking, w.ThinkingAdaptive):
        return TaskReasoning()  # "Claude decides": the model's own default
    if isinstance(thinking, w.ThinkingBetweenTools):
        return TaskReasoning(enabled=True)
    budget = thinking.budget_tokens
    if budget < MIN_THINKING_BUDGET:
        raise RequestInvalid(f"thinking.budget_tokens: must be at least {MIN_THINKING_BUDGET}",
                             param="thinking")
    if max_tokens is not None and budget >= max_tokens:
        raise RequestInvalid("max_tokens must be greater than thinking.budget_tokens", param="max_tokens")
    return TaskReasoning(enabled=True, budget=budget)


def _task(req: w.CountTokensRequest, max_tokens: int | None) -> tuple[Task, MessagesOptions]:
    if req.mcp_servers:
        raise _unsupported("mcp_servers is not supported: this server connects to no MCP server",
                           "mcp_servers")
    tools = _tools(req)
    choice, parallel = _tool_choice(req.tool_choice, tools)
    fmt = req.output_config.format if req.output_config else None
    display = getattr(req.thinking, "display", None)
    # A final assistant message is Anthropic's prefill: the answer continues it.
    messages, prefill, generation_prompt = continuation(_messages(req), None, True)
    task = Task(messages=tuple(messages), prefill=prefill, add_generation_prompt=generation_prompt,
                tools=tuple(tools), tool_choice=choice,
                parallel_tool_calls=parallel, max_tokens=max_tokens,
                json_schema=fmt.schema if fmt else None, reasoning=_reasoning(req.thinking, max_tokens))
    return task, MessagesOptions(model=req.model, omit_thinking=display == "omitted")


def parse(body: bytes) -> tuple[Task, MessagesOptions]:
    """Check a `POST /v1/messages` body and map it to a Task."""
    req = _decode(body, _REQUEST)
    task, options = _task(req, req.max_tokens)
    sampling = Sampling()
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            sampling = replace(sampling, **{name: value})
    stop = tuple(req.stop_sequences or ())
    stream = bool(req.stream)
    task = replace(task, stop=stop, sampling=sampling, stream=stream)
    user_id = req.metadata.user_id if req.metadata else None
    return task, replace(options, stream=stream, stop_sequences=stop, user_id=user_id)


def parse_count_tokens(body: bytes) -> tuple[Task, MessagesOptions]:
    """Check a `POST /v1/messages/count_tokens` body (no max_tokens) and map it to a Task."""
    req = _decode(body, _COUNT_REQUEST)
    return _task(req, None)


def count_tokens_body(n: int) -> bytes:
    return _json.encode(w.CountOut(n))


# ---------------------------------------------------------------- rendering


def _new_id(prefix: str) -> str:
    return prefix + "01" + "".join(secrets.choice(_ALNUM) for _ in range(22))  # Anthropic's id shape


def tool_use_id(call_id: str) -> str:
    """The id a tool call gets on Anthropic's wire: "call_x" becomes "toolu_x"."""
    if not call_id:
        return _new_id("toolu_")
    if call_id.startswith("call_"):
        return "toolu_" + call_id.removeprefix("call_")
    return call_id


def _signature(thinking: str) -> str:
    # Anthropic's signature lets it verify thinking passed back; here it verifies nothing,
    # but some clients drop thinking blocks without one when they replay the conversation.
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic's `input` must be."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}  # cut short by max_tokens (or malformed): llama-server sends {} too
    return value if isinstance(value, dict) else {}


@dataclass
class _Open:
    """The content block being streamed: at most one is open at a time."""

    kind: str  # "thinking" | "text" | "tool_use"
    index: int
    parts: list[str] = field(default_factory=list)
    id: str = ""
    name: str = ""
    tool_index: int = -1


class MessagesRenderer:
    """The bytes of one Message, streamed (start, delta..., finish) or whole (body)."""

    def __init__(self, model: str, options: MessagesOptions, *, message_id: str | None = None) -> None:
        self.id = message_id or _new_id("msg_")
        self._model = model
        self._options = options
        self._sse = True
        self._content: list[w.ContentOut] = []
        self._open: _Open | None = None

    def _emit(self, event: w.Event) -> bytes:
        if not self._sse:
            return b""
        tag = str(type(event).__struct_config__.tag)
        return b"event: " + tag.encode() + b"\ndata: " + _json.encode(event) + b"\n\n"

    def start(self, prompt_tokens: int = 0, cached_tokens: int = 0) -> bytes:
        """message_start (its usage as known now; message_delta repeats the final counts) and a ping."""
        usage = w.UsageOut(prompt_tokens - cached_tokens, 0, 0, cached_tokens)
        message = w.MessageOut(id=self.id, model=self._model, content=[], stop_reason=None,
                               stop_sequence=None, usage=usage)
        return self._emit(w.MessageStart(message)) + self._emit(w.Ping())

    def delta(self, d: Delta) -> bytes:
        if isinstance(d, Text):
            if not d.text:
                return b""
            out, op = self._block("text", w.TextOut(""))
            op.parts.append(d.text)
            return out + self._emit(w.BlockDelta(op.index, w.TextDelta(d.text)))
        if isinstance(d, Reasoning):
            if not d.text:
                return b""
            out, op = self._block("thinking", w.ThinkingOut("", ""))
            op.parts.append(d.text)
            if self._options.omit_thinking:
                return out
            return out + self._emit(w.BlockDelta(op.index, w.ThinkingDelta(d.text)))
        if isinstance(d, ToolCallBegin):
            out = self._close()
            op = self._open = _Open("tool_use", len(self._content), id=tool_use_id(d.id), name=d.name,
                                    tool_index=d.index)
            return out + self._emit(w.BlockStart(op.index, w.ToolUseOut(op.id, d.name, {})))
        op_ = self._open
        if op_ is None or op_.kind != "tool_use" or op_.tool_index != d.index:
            raise ValueError(f"arguments of tool call {d.index}, which is not the open content block")
        if not d.text:
            return b""
        op_.parts.append(d.text)
        return self._emit(w.BlockDelta(op_.index, w.InputJsonDelta(d.text)))

    def _block(self, kind: str, start: w.ContentOut) -> tuple[bytes, _Open]:
        """The open block if it is of this kind, else a new one (closing the open one)."""
        if self._open is not None and self._open.kind == kind:
            return b"", self._open
        out = self._close()
        op = self._open = _Open(kind, len(self._content))
        return out + self._emit(w.BlockStart(op.index, start)), op

    def _close(self) -> bytes:
        op, self._open = self._open, None
        if op is None:
            return b""
        text = "".join(op.parts)
        out = b""
        block: w.ContentOut
        if op.kind == "text":
            block = w.TextOut(text)
        elif op.kind == "thinking":
            signature = _signature(text)
            out = self._emit(w.BlockDelta(op.index, w.SignatureDelta(signature)))
            block = w.ThinkingOut("" if self._options.omit_thinking else text, signature)
        else:
            block = w.ToolUseOut(op.id, op.name, _input(text))
        self._content.append(block)
        return out + self._emit(w.BlockStop(op.index))

    def _stop(self, f: Finish) -> w.StopOut:
        if f.reason == "length":
            return w.StopOut("max_tokens", None)
        called = any(isinstance(b, w.ToolUseOut) for b in self._content)
        if f.tool_calls or f.reason == "tool_calls" or called:
            return w.StopOut("tool_use", None)
        # Only a stop sequence the client gave is reported as one (not a template's own stop).
        if f.stop_sequence is not None and f.stop_sequence in self._options.stop_sequences:
            return w.StopOut("stop_sequence", f.stop_sequence)
        return w.StopOut("end_turn", None)

    @staticmethod
    def _usage(f: Finish) -> w.UsageOut:
        u = f.usage
        return w.UsageOut(u.prompt_tokens - u.cached_tokens, u.completion_tokens, 0, u.cached_tokens)

    def finish(self, f: Finish) -> bytes:
        """Closes the open block, then message_delta (stop reason, final usage) and message_stop."""
        out = self._close()
        return out + self._emit(w.MessageDelta(self._stop(f), self._usage(f))) + self._emit(w.MessageStop())

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        """An error after the stream started (before it, answer `anthropic_error_body`)."""
        return anthropic_error_event(kind, message) if self._sse else b""

    def body(self, deltas: Iterable[Delta], finish: Finish) -> bytes:
        """The whole Message, for a request that did not ask to stream."""
        self._sse = False
        for d in deltas:
            self.delta(d)
        self._close()
        stop = self._stop(finish)
        return _json.encode(w.MessageOut(id=self.id, model=self._model, content=self._content,
                                         stop_reason=stop.stop_reason, stop_sequence=stop.stop_sequence,
                                         usage=self._usage(finish)))
