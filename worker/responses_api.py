"""OpenAI's Responses API (`POST /v1/responses`): the request parsed into a `Task`.

`parse` checks the body and maps it to a chat-shaped Task; `ResponsesOptions` keeps what
the answer echoes back and what the caller acts on (store, previous_response_id). A stored
response is continued by rebuilding its conversation with `history_messages` and putting
it in front of the new input with `with_history`.
The answer's bytes are rendered by worker.responses_render.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import msgspec
from msgspec import UNSET

from protocol.errors import ErrorKind, param_of
from worker import responses_wire as w
from worker.schema import RequestInvalid
from worker.task import Message, Sampling, Task, Tool, ToolCall, ToolChoice
from worker.task import Reasoning as TaskReasoning

T = TypeVar("T")

_json = msgspec.json.Encoder()
_REQUEST = msgspec.json.Decoder(w.ResponsesRequest)
_ITEM_HEAD = msgspec.json.Decoder(w.ItemHead)
_MESSAGE = msgspec.json.Decoder(w.MessageItem)
_CALL = msgspec.json.Decoder(w.FunctionCallItem)
_CALL_OUTPUT = msgspec.json.Decoder(w.FunctionCallOutputItem)
_REASONING = msgspec.json.Decoder(w.ReasoningItem)
_TOOL_HEAD = msgspec.json.Decoder(w.ToolHead)
_FUNCTION_TOOL = msgspec.json.Decoder(w.FunctionToolIn)
_STORED_REQUEST = msgspec.json.Decoder(w.StoredRequest)
_STORED_RESPONSE = msgspec.json.Decoder(w.StoredResponse)

_Item = w.MessageItem | w.FunctionCallItem | w.FunctionCallOutputItem | w.ReasoningItem


@dataclass(frozen=True)
class ResponsesOptions:
    """What a Response echoes from its request, and what the caller acts on."""

    model: str
    stream: bool = False
    store: bool = True  # OpenAI's default: the response can be fetched (and continued) by id
    previous_response_id: str | None = None
    instructions: str | None = None
    tools: list[w.FunctionToolOut] = field(default_factory=list)
    tool_choice: w.ToolChoiceOut = "auto"
    parallel_tool_calls: bool = True
    text: w.TextConfig = field(default_factory=w.TextConfig)
    reasoning: w.ReasoningConfig = field(default_factory=w.ReasoningConfig)
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    temperature: float | None = None  # None: not given, the model's default was used
    top_p: float | None = None
    truncation: str = "disabled"  # "auto" is echoed; dropping old turns is up to the caller
    metadata: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None


# ---------------------------------------------------------------- parsing


def _at(message: str, where: str) -> str:
    """A msgspec error about a nested value, with its path from the body's root."""
    if " - at `$" in message:
        return message.replace(" - at `$", f" - at `$.{where}", 1)
    return f"{message} - at `$.{where}`"


def _param(message: str) -> str | None:
    param = param_of(message)
    missing = "missing required field `"
    if param is None and missing in message:  # a top-level field: msgspec names no path
        param = message.split(missing, 1)[1].split("`", 1)[0]
    return param


def _decode(data: bytes, decoder: msgspec.json.Decoder[T], where: str = "") -> T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = _at(str(exc), where) if where else str(exc)
        raise RequestInvalid(f"invalid request: {text}", param=_param(text)) from exc
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"malformed JSON body: {exc}") from exc


def _unsupported(message: str, param: str) -> RequestInvalid:
    return RequestInvalid(message, kind=ErrorKind.UNSUPPORTED, param=param)


def _refuse_platform_features(req: w.ResponsesRequest) -> None:
    if req.background:
        raise _unsupported("background responses are not supported: stream instead", "background")
    if req.conversation is not None:
        raise _unsupported("conversations are not supported: use previous_response_id", "conversation")
    if req.prompt is not None:
        raise _unsupported("stored prompt templates are not supported", "prompt")
    if req.top_logprobs:
        raise _unsupported("top_logprobs: logprobs are not supported yet", "top_logprobs")
    if req.include and "message.output_text.logprobs" in req.include:
        raise _unsupported("include: message.output_text.logprobs is not supported yet", "include")


def _tools(raw: list[msgspec.Raw] | None) -> tuple[list[Tool], list[w.FunctionToolOut]]:
    tools: list[Tool] = []
    echo: list[w.FunctionToolOut] = []
    for i, item in enumerate(raw or ()):
        kind = _decode(item, _TOOL_HEAD, f"tools[{i}]").type
        if kind != "function":
            raise _unsupported(f"tools[{i}]: tool type {kind!r} is not supported; only function tools are",
                               "tools")
        fn = _decode(item, _FUNCTION_TOOL, f"tools[{i}]")
        strict = True if fn.strict is None else fn.strict  # the Responses API's default
        tools.append(Tool(fn.name, fn.description or "", fn.parameters or {}, strict))
        echo.append(w.FunctionToolOut(name=fn.name, description=fn.description, parameters=fn.parameters,
                                      strict=strict))
    return tools, echo


def _tool_choice(choice: w.ToolChoiceMode | w.ToolChoiceObject | None,
                 tools: list[Tool]) -> tuple[ToolChoice, w.ToolChoiceOut, list[Tool]]:
    """The Task's tool choice, its echo, and the tools the model may call."""
    names = {t.name for t in tools}
    if choice is None:
        return ToolChoice("auto"), "auto", tools
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise RequestInvalid("tool_choice 'required' needs tools", param="tool_choice")
        return ToolChoice(choice), choice, tools
    if choice.type == "function":
        if choice.name not in names:
            raise RequestInvalid(f"tool_choice names {choice.name!r}, which is not in tools",
                                 param="tool_choice")
        return ToolChoice("named", choice.name), w.ToolChoiceFunctionOut(choice.name), tools
    if choice.type == "allowed_tools":
        allowed = choice.tools or []
        picked = [t.name for t in allowed]
        if not allowed or any(t.type != "function" or t.name not in names for t in allowed):
            raise RequestInvalid("tool_choice.tools must name function tools given in tools",
                                 param="tool_choice")
        mode = choice.mode or "auto"
        # Only the allowed tools reach the model; the Response still echoes them all.
        echo = w.ToolChoiceAllowedOut(mode, [{"type": "function", "name": n or ""} for n in picked])
        return ToolChoice(mode), echo, [t for t in tools if t.name in picked]
    raise _unsupported(f"tool_choice type {choice.type!r} is not supported: only function tools are",
                       "tool_choice")


def _items(raw: list[msgspec.Raw], where: str) -> list[_Item]:
    items: list[_Item] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        kind = _decode(item, _ITEM_HEAD, at).type
        if kind == "message":
            items.append(_decode(item, _MESSAGE, at))
        elif kind == "function_call":
            items.append(_decode(item, _CALL, at))
        elif kind == "function_call_output":
            items.append(_decode(item, _CALL_OUTPUT, at))
        elif kind == "reasoning":
            items.append(_decode(item, _REASONING, at))
        else:
            # item_reference would need every stored item by id; built-in tools' calls
            # (web_search_call, computer_call, ...) come from tools this server does not run.
            raise _unsupported(f"{at}: input item type {kind!r} is not supported", "input")
    return items


def _text(content: w.Content, role: str, at: str) -> str:
    """A message's (or a tool output's) text; non-text parts are refused."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if isinstance(part, w.InputText | w.OutputText):
            texts.append(part.text)
        elif isinstance(part, w.Refusal) and role == "assistant":
            texts.append(part.refusal)
        elif isinstance(part, w.InputImage | w.InputFile | w.InputAudio):
            raise _unsupported(f"{at}: content part type {type(part).__struct_config__.tag!r} is not "
                               "supported by this model", "input")
        else:
            raise RequestInvalid(f"{at}: content part type {type(part).__struct_config__.tag!r} is not "
                                 f"allowed in a {role} message", param="input")
    return "".join(texts)


class _Turns:
    """Items to chat messages. The assistant side of a turn (reasoning, text, function
    calls) comes as separate items; chat templates want it as one assistant message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._reasoning: list[str] = []
        self._text: list[str] = []
        self._calls: list[ToolCall] = []

    def add(self, item: _Item, at: str) -> None:
        if isinstance(item, w.MessageItem) and item.role == "assistant":
            if self._calls:  # text after the calls starts the next assistant message
                self._flush()
            self._text.append(_text(item.content, "assistant", at))
        elif isinstance(item, w.FunctionCallItem):
            self._calls.append(ToolCall(item.call_id, item.name, item.arguments))
        elif isinstance(item, w.ReasoningItem):
            text = self._reasoning_text(item)
            if text:
                if self._text or self._calls:  # thinking again after it answered: a new message
                    self._flush()
                self._reasoning.append(text)
        elif isinstance(item, w.FunctionCallOutputItem):
            self._flush()
            self.messages.append(Message("tool", _text(item.output, "tool", at), tool_call_id=item.call_id))
        else:
            self._flush()
            role = "system" if item.role == "developer" else item.role
            self.messages.append(Message(role, _text(item.content, item.role, at)))

    @staticmethod
    def _reasoning_text(item: w.ReasoningItem) -> str:
        # Our own reasoning items carry the full text; OpenAI's carry only a summary (and
        # encrypted content, meaningless here): the summary is the best stand-in.
        parts = [p.text for p in item.content or () if isinstance(p, w.ReasoningText)]
        if parts:
            return "".join(parts)
        return "\n\n".join(p.text for p in item.summary if isinstance(p, w.SummaryText))

    def _flush(self) -> None:
        if self._text or self._calls or self._reasoning:
            self.messages.append(Message("assistant", "".join(self._text), tool_calls=tuple(self._calls),
                                         reasoning_content="\n\n".join(self._reasoning) or None))
        self._reasoning, self._text, self._calls = [], [], []

    def done(self) -> list[Message]:
        self._flush()
        return self.messages


def _messages(groups: Iterable[tuple[str | list[msgspec.Raw], str]]) -> list[Message]:
    turns = _Turns()
    for value, where in groups:
        if isinstance(value, str):
            turns.add(w.MessageItem(role="user", content=value), where)
            continue
        for i, item in enumerate(_items(value, where)):
            turns.add(item, f"{where}[{i}]")
    return turns.done()


def parse(body: bytes) -> tuple[Task, ResponsesOptions]:
    """Check a `POST /v1/responses` body (or `/v1/responses/input_tokens`) and map it to a Task."""
    req = _decode(body, _REQUEST)
    _refuse_platform_features(req)
    tools, tools_echo = _tools(req.tools)
    choice, choice_echo, offered = _tool_choice(req.tool_choice, tools)
    messages = [Message("system", req.instructions)] if req.instructions else []
    if req.input is UNSET:
        if req.previous_response_id is None:
            raise RequestInvalid("input is required", param="input")
    else:
        messages += _messages([(req.input, "input")])
    text = req.text or w.TextConfig()
    reasoning = req.reasoning or w.ReasoningConfig()
    sampling = Sampling()
    if req.temperature is not None:
        sampling = replace(sampling, temperature=req.temperature)
    if req.top_p is not None:
        sampling = replace(sampling, top_p=req.top_p)
    stream = bool(req.stream)
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    task = Task(
        messages=tuple(messages),
        tools=tuple(offered),
        tool_choice=choice,
        parallel_tool_calls=parallel,
        max_tokens=req.max_output_tokens,
        sampling=sampling,
        json_schema=text.format.schema if isinstance(text.format, w.FormatJsonSchema) else None,
        json_object=isinstance(text.format, w.FormatJsonObject),
        reasoning=TaskReasoning(enabled=None if reasoning.effort is None
                                else reasoning.effort not in ("none", "minimal")),
        stream=stream,
    )
    options = ResponsesOptions(
        model=req.model, stream=stream, store=True if req.store is None else req.store,
        previous_response_id=req.previous_response_id, instructions=req.instructions,
        tools=tools_echo, tool_choice=choice_echo, parallel_tool_calls=parallel, text=text,
        reasoning=reasoning, max_output_tokens=req.max_output_tokens, max_tool_calls=req.max_tool_calls,
        temperature=req.temperature, top_p=req.top_p, truncation=req.truncation or "disabled",
        metadata=req.metadata or {}, user=req.user, safety_identifier=req.safety_identifier,
        prompt_cache_key=req.prompt_cache_key,
    )
    return task, options


def history_messages(turns: Sequence[tuple[bytes, bytes]]) -> tuple[Message, ...]:
    """The conversation a previous_response_id continues: for each stored response, oldest
    first, its request body's `input` and its Response body's `output`. A stored request's
    `instructions` are not carried over (OpenAI's rule: each request gives its own)."""
    groups: list[tuple[str | list[msgspec.Raw], str]] = []
    for request_body, response_body in turns:
        groups.append((_decode(request_body, _STORED_REQUEST).input, "input"))
        groups.append((_decode(response_body, _STORED_RESPONSE).output, "output"))
    return tuple(_messages(groups))


def with_history(task: Task, options: ResponsesOptions, history: Sequence[Message]) -> Task:
    """The task with a previous response's conversation between its instructions and its input."""
    messages = task.messages or ()
    head = 1 if options.instructions else 0
    return replace(task, messages=(*messages[:head], *history, *messages[head:]))


def input_tokens_body(n: int) -> bytes:
    """The answer of `POST /v1/responses/input_tokens`."""
    return _json.encode(w.InputTokensOut("response.input_tokens", n))
