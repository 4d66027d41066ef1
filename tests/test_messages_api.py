"""worker.messages_api: Anthropic Messages requests parsed into Tasks, and the rendered bytes
checked against the official anthropic client: every stream event and Message strictly
validated with its types (no missing field, no unknown key), and the bytes fed to the
client's own MessageStream accumulator and non-streaming parser through a mock transport."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import MessageParam, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from protocol.errors import ErrorKind
from worker.messages_api import (
    MessagesOptions,
    MessagesRenderer,
    anthropic_error_body,
    anthropic_error_event,
    anthropic_status,
    count_tokens_body,
    parse,
    parse_count_tokens,
    tool_use_id,
)
from worker.outputs import Delta, Finish, Reasoning, Text, Timings, ToolCallArgs, ToolCallBegin, Usage
from worker.schema import RequestInvalid
from worker.task import Message, Sampling, ToolCall, ToolChoice

EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
MESSAGE = TypeAdapter(AnthropicMessage)
TIMINGS = Timings(prompt_n=8, prompt_ms=4.0, predicted_n=5, predicted_ms=10.0, cache_n=4)
USER: list[MessageParam] = [{"role": "user", "content": "hi"}]


def finish(reason: str = "stop", prompt: int = 12, completion: int = 5, cached: int = 4,
           stop_sequence: str | None = None, tool_calls: int = 0) -> Finish:
    return Finish(reason, Usage(prompt, completion, cached), TIMINGS, stop_sequence=stop_sequence,
                  tool_calls=tool_calls)


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "max_tokens": 4096, "messages": USER, **fields}).encode()


def assert_no_extra(value: object, path: str = "$") -> None:
    """Every key we sent is a field of the client's type (the types accept unknown keys)."""
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{path}: keys unknown to the client: {sorted(value.model_extra)}"
        for name in type(value).model_fields:
            assert_no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_extra(item, f"{path}[{i}]")


def events(raw: bytes) -> list[dict[str, Any]]:
    """Split SSE bytes into events: an `event:` line naming each data's type (the SDK drops
    events without one), each strictly validated as an anthropic RawMessageStreamEvent."""
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw[:-2].split(b"\n\n"):
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[len(b"data: "):])
        assert payload["type"] == name[len(b"event: "):].decode()
        if payload["type"] == "ping":  # not part of RawMessageStreamEvent: the SDK skips it
            assert payload == {"type": "ping"}
        else:
            assert_no_extra(EVENT.validate_python(payload, strict=True))
        out.append(payload)
    return out


def options(**fields: Any) -> MessagesOptions:
    return MessagesOptions(model="tiny", **fields)


def render(deltas: Sequence[Delta], fin: Finish, opts: MessagesOptions | None = None,
           message_id: str = "msg_01test") -> bytes:
    r = MessagesRenderer("tiny", opts or options(), message_id=message_id)
    u = fin.usage
    return r.start(u.prompt_tokens, u.cached_tokens) + b"".join(r.delta(d) for d in deltas) + r.finish(fin)


def whole(deltas: Sequence[Delta], fin: Finish, opts: MessagesOptions | None = None) -> bytes:
    return MessagesRenderer("tiny", opts or options(), message_id="msg_01test").body(deltas, fin)


def client(payload: bytes, stream: bool = True, status: int = 200) -> anthropic.Anthropic:
    kind = "text/event-stream" if stream else "application/json"

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=payload, headers={"content-type": kind})

    return anthropic.Anthropic(api_key="sk-test", base_url="http://modelherd.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


def summary(message: AnthropicMessage) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for block in message.content:
        if block.type == "text":
            out.append(("text", block.text))
        elif block.type == "thinking":
            out.append(("thinking", block.thinking, bool(block.signature)))
        elif block.type == "tool_use":
            out.append(("tool_use", block.id, block.name, block.input))
        else:
            raise AssertionError(f"unexpected block {block.type}")
    return out


ARGS = ['{"loc', 'ation": "Pa', 'ris"}']
SCENARIOS: dict[str, tuple[list[Delta], Finish, list[tuple[Any, ...]], str]] = {
    "text": ([Text("Hel"), Text("lo"), Text(" world")], finish(), [("text", "Hello world")], "end_turn"),
    "thinking_then_text": ([Reasoning("Let me "), Reasoning("think."), Text("Hi!")], finish(),
                           [("thinking", "Let me think.", True), ("text", "Hi!")], "end_turn"),
    "tool_call_args_in_pieces": (
        [ToolCallBegin(0, "call_abc", "get_weather"), *[ToolCallArgs(0, a) for a in ARGS]],
        finish("tool_calls", tool_calls=1),
        [("tool_use", "toolu_abc", "get_weather", {"location": "Paris"})], "tool_use"),
    "parallel_tool_calls": (
        [Reasoning("Both."), Text("Checking."), ToolCallBegin(0, "call_a", "get_weather"),
         ToolCallArgs(0, '{"city":'), ToolCallArgs(0, '"Paris"}'), ToolCallBegin(1, "call_b", "get_time"),
         ToolCallArgs(1, "{}")],
        finish("tool_calls", tool_calls=2),
        [("thinking", "Both.", True), ("text", "Checking."),
         ("tool_use", "toolu_a", "get_weather", {"city": "Paris"}), ("tool_use", "toolu_b", "get_time", {})],
        "tool_use"),
    "length": ([Text("Hello"), Text(" wor")], finish("length"), [("text", "Hello wor")], "max_tokens"),
    "length_inside_tool_call": ([ToolCallBegin(0, "call_x", "f"), ToolCallArgs(0, '{"a": "b')],
                                finish("length"), [("tool_use", "toolu_x", "f", {})], "max_tokens"),
}


# ---------------------------------------------------------------- rendering


def test_text_stream_event_order() -> None:
    evs = events(render([Text("Hel"), Text("lo")], finish(prompt=12, cached=4, completion=2)))
    assert [e["type"] for e in evs] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop"]
    assert evs[0]["message"] == {
        "id": "msg_01test", "type": "message", "role": "assistant", "model": "tiny", "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 8, "output_tokens": 0, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 4}}
    assert evs[2] == {"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}}
    assert [e["delta"] for e in evs[3:5]] == [{"type": "text_delta", "text": "Hel"},
                                              {"type": "text_delta", "text": "lo"}]
    assert evs[5] == {"type": "content_block_stop", "index": 0}
    assert evs[6] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                      "usage": {"input_tokens": 8, "output_tokens": 2, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 4}}


def test_blocks_close_before_the_next_opens() -> None:
    evs = events(render(SCENARIOS["parallel_tool_calls"][0], SCENARIOS["parallel_tool_calls"][1]))
    open_index = None
    starts = []
    for e in evs:
        if e["type"] == "content_block_start":
            assert open_index is None, "a block started while another was open"
            open_index = e["index"]
            starts.append(e)
        elif e["type"] in ("content_block_delta", "content_block_stop"):
            assert e["index"] == open_index
            if e["type"] == "content_block_stop":
                open_index = None
    assert open_index is None
    assert [s["index"] for s in starts] == [0, 1, 2, 3]
    assert starts[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "toolu_a", "name": "get_weather",
                                          "input": {}}
    thinking = [e for e in evs if e.get("index") == 0]
    assert [e["type"] for e in thinking] == ["content_block_start", "content_block_delta",
                                            "content_block_delta",
                                            "content_block_stop"]
    assert thinking[2]["delta"]["type"] == "signature_delta" and thinking[2]["delta"]["signature"]
    pieces = [e["delta"]["partial_json"] for e in evs
              if e.get("index") == 2 and e["type"] == "content_block_delta"]
    assert pieces == ['{"city":', '"Paris"}']


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_client_accumulates_the_stream_and_parses_the_body(name: str) -> None:
    deltas, fin, expected, stop = SCENARIOS[name]
    raw = render(deltas, fin)
    events(raw)
    with client(raw).messages.stream(model="tiny", max_tokens=64, messages=USER) as stream:
        final = stream.get_final_message()
    assert summary(final) == expected
    assert (final.id, final.model, final.stop_reason) == ("msg_01test", "tiny", stop)
    assert final.stop_sequence is None
    assert final.usage.input_tokens == 8 and final.usage.cache_read_input_tokens == 4
    assert final.usage.output_tokens == fin.usage.completion_tokens

    raw_whole = whole(deltas, fin)
    assert_no_extra(MESSAGE.validate_python(json.loads(raw_whole), strict=True))
    created = client(raw_whole, stream=False).messages.create(model="tiny", max_tokens=64, messages=USER)
    assert created.model_dump() == final.model_dump()  # streamed and whole answers agree


@pytest.mark.parametrize("fin, stops, expected", [
    (finish(stop_sequence="END"), ("END",), ("stop_sequence", "END")),
    # The template's own stop string is not the client's stop sequence.
    (finish(stop_sequence="<|im_end|>"), ("END",), ("end_turn", None)),
    (finish(), ("END",), ("end_turn", None)),
    (finish("length", stop_sequence="END"), ("END",), ("max_tokens", None)),
    (finish("tool_calls", tool_calls=1), (), ("tool_use", None)),
])
def test_stop_reason(fin: Finish, stops: tuple[str, ...], expected: tuple[str, str | None]) -> None:
    opts = options(stop_sequences=stops)
    evs = events(render([Text("x")], fin, opts))
    assert (evs[-2]["delta"]["stop_reason"], evs[-2]["delta"]["stop_sequence"]) == expected
    message = json.loads(whole([Text("x")], fin, opts))
    assert (message["stop_reason"], message["stop_sequence"]) == expected


def test_tool_use_ids() -> None:
    assert tool_use_id("call_abc") == "toolu_abc"
    assert tool_use_id("Xq3b9kP0") == "Xq3b9kP0"  # a backend's own id shape is kept
    minted = tool_use_id("")
    assert minted.startswith("toolu_01") and len(minted) == len("toolu_01") + 22


def test_omitted_thinking_keeps_only_the_signature() -> None:
    opts = options(omit_thinking=True)
    evs = events(render([Reasoning("secret"), Text("Hi")], finish(), opts))
    assert not any(e.get("delta", {}).get("type") == "thinking_delta" for e in evs)
    message = json.loads(whole([Reasoning("secret"), Text("Hi")], finish(), opts))
    assert message["content"][0]["thinking"] == "" and message["content"][0]["signature"]


def test_arguments_for_a_call_that_is_not_open_are_refused() -> None:
    r = MessagesRenderer("tiny", options())
    r.start()
    r.delta(ToolCallBegin(0, "call_a", "f"))
    r.delta(Text("between"))
    with pytest.raises(ValueError, match="tool call 0"):
        r.delta(ToolCallArgs(0, "{}"))


ERRORS = [
    (ErrorKind.INVALID_REQUEST, 400, "invalid_request_error", anthropic.BadRequestError),
    (ErrorKind.CONTEXT_LENGTH_EXCEEDED, 400, "invalid_request_error", anthropic.BadRequestError),
    (ErrorKind.UNSUPPORTED, 400, "invalid_request_error", anthropic.BadRequestError),
    (ErrorKind.AUTHENTICATION, 401, "authentication_error", anthropic.AuthenticationError),
    (ErrorKind.NOT_FOUND, 404, "not_found_error", anthropic.NotFoundError),
    (ErrorKind.CONFLICT, 409, "invalid_request_error", anthropic.ConflictError),
    (ErrorKind.TOO_LARGE, 413, "request_too_large", anthropic.ContentTooLargeError),
    (ErrorKind.RATE_LIMITED, 429, "rate_limit_error", anthropic.RateLimitError),
    (ErrorKind.INTERNAL, 500, "api_error", anthropic.InternalServerError),
    (ErrorKind.WORKER_FAILED, 500, "api_error", anthropic.InternalServerError),
    (ErrorKind.UNAVAILABLE, 529, "overloaded_error", anthropic.OverloadedError),
]


def test_every_error_kind_has_an_anthropic_type() -> None:
    for kind in ErrorKind:
        assert json.loads(anthropic_error_body(kind, "m"))["error"]["type"]
        assert 400 <= anthropic_status(kind) < 600


@pytest.mark.parametrize("kind, status, kind_name, exc", ERRORS)
def test_errors(kind: ErrorKind, status: int, kind_name: str, exc: type[anthropic.APIStatusError]) -> None:
    raw = anthropic_error_body(kind, "went wrong")
    assert json.loads(raw) == {"type": "error", "error": {"type": kind_name, "message": "went wrong"}}
    assert anthropic_status(kind) == status
    if kind_name != "request_too_large":  # Anthropic's 413 type, missing from the SDK's ErrorResponse union
        assert_no_extra(TypeAdapter(ErrorResponse).validate_python(json.loads(raw), strict=True))
    with pytest.raises(exc) as info:
        client(raw, stream=False, status=status).messages.create(model="tiny", max_tokens=8, messages=USER)
    assert info.value.status_code == status
    assert info.value.body == json.loads(raw)


def test_error_mid_stream() -> None:
    r = MessagesRenderer("tiny", options())
    raw = r.start(3) + r.delta(Text("Hi")) + r.fail(ErrorKind.UNAVAILABLE, "Overloaded")
    assert raw.endswith(anthropic_error_event(ErrorKind.UNAVAILABLE, "Overloaded"))
    assert raw.endswith(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
                        b'"message":"Overloaded"}}\n\n')
    with pytest.raises(anthropic.APIStatusError) as info, \
            client(raw).messages.stream(model="tiny", max_tokens=8, messages=USER) as stream:
        stream.get_final_message()
    assert info.value.body == {"type": "error",
                               "error": {"type": "overloaded_error", "message": "Overloaded"}}


def test_count_tokens() -> None:
    raw = count_tokens_body(14)
    assert_no_extra(TypeAdapter(MessageTokensCount).validate_python(json.loads(raw), strict=True))
    got = client(raw, stream=False).messages.count_tokens(model="tiny", messages=USER)
    assert got.input_tokens == 14
    task, _ = parse_count_tokens(json.dumps({"model": "m", "messages": USER, "system": "s"}).encode())
    assert task.messages == (Message("system", "s"), Message("user", "hi")) and task.max_tokens is None


# ---------------------------------------------------------------- parsing


def test_simple_request() -> None:
    task, opts = parse(body(system="Be terse."))
    assert task.messages == (Message("system", "Be terse."), Message("user", "hi"))
    assert (task.max_tokens, task.stream, task.stop, task.tools) == (4096, False, (), ())
    assert task.reasoning.enabled is None and task.tool_choice == ToolChoice("auto")
    assert (opts.model, opts.stream, opts.stop_sequences, opts.user_id) == ("m", False, (), None)


def test_system_blocks_are_joined() -> None:
    task, _ = parse(body(system=[{"type": "text", "text": "One."},
                                 {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}}]))
    assert task.messages is not None and task.messages[0] == Message("system", "One.\n\nTwo.")


def test_conversation_blocks() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "<reminder>"},
                                     {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Need the tool.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Zürich"}},
            {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "22C"},
            {"type": "tool_result", "tool_use_id": "toolu_01B", "is_error": True,
             "content": [{"type": "text", "text": "clock"}, {"type": "text", "text": "broken"}]},
            {"type": "text", "text": "And tomorrow?"}]},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01C"}]},
    ]
    task, _ = parse(body(messages=messages))
    assert task.messages == (
        Message("user", "<reminder>\n\nWeather?"),
        Message("assistant", "Checking.",
                tool_calls=(ToolCall("toolu_01A", "get_weather", '{"city": "Zürich"}'),
                            ToolCall("toolu_01B", "get_time", "{}")),
                reasoning_content="Need the tool."),
        Message("tool", "22C", tool_call_id="toolu_01A"),
        Message("tool", "Error: clock\n\nbroken", tool_call_id="toolu_01B"),
        Message("user", "And tomorrow?"),
        Message("assistant", "Sunny."),
        Message("tool", "", tool_call_id="toolu_01C"),
    )


def test_system_role_message() -> None:
    task, _ = parse(body(messages=[{"role": "system", "content": [{"type": "text", "text": "S"}]}, *USER]))
    assert task.messages == (Message("system", "S"), Message("user", "hi"))


WEATHER = {"name": "get_weather", "description": "Weather now", "input_schema": {"type": "object"}}
TIME = {"type": "custom", "name": "get_time", "input_schema": {"type": "object", "properties": {}},
        "strict": True}


def test_tools() -> None:
    task, _ = parse(body(tools=[WEATHER, TIME]))
    assert [(t.name, t.description, t.parameters, t.strict) for t in task.tools] == [
        ("get_weather", "Weather now", {"type": "object"}, False),
        ("get_time", "", {"type": "object", "properties": {}}, True)]


@pytest.mark.parametrize("choice, expected, parallel", [
    ({"type": "auto"}, ToolChoice("auto"), True),
    ({"type": "any"}, ToolChoice("required"), True),
    ({"type": "tool", "name": "get_time"}, ToolChoice("named", "get_time"), True),
    ({"type": "none"}, ToolChoice("none"), True),
    ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto"), False),
    ({"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}, ToolChoice("named", "get_time"),
     False),
])
def test_tool_choice(choice: dict[str, Any], expected: ToolChoice, parallel: bool) -> None:
    task, _ = parse(body(tools=[WEATHER, TIME], tool_choice=choice))
    assert task.tool_choice == expected and task.parallel_tool_calls is parallel


@pytest.mark.parametrize("thinking, enabled, budget", [
    ({"type": "enabled", "budget_tokens": 2048}, True, 2048),
    ({"type": "enabled", "budget_tokens": 1024, "display": "summarized"}, True, 1024),
    ({"type": "disabled"}, False, None),
    ({"type": "adaptive"}, None, None),
])
def test_thinking(thinking: dict[str, Any], enabled: bool | None, budget: int | None) -> None:
    task, opts = parse(body(thinking=thinking))
    assert (task.reasoning.enabled, task.reasoning.budget) == (enabled, budget)
    assert opts.omit_thinking is False


def test_thinking_display_omitted() -> None:
    _, opts = parse(body(thinking={"type": "enabled", "budget_tokens": 2048, "display": "omitted"}))
    assert opts.omit_thinking is True


def test_sampling_stop_stream_metadata_and_format() -> None:
    task, opts = parse(body(temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["END", "STOP"], stream=True,
                            metadata={"user_id": "u-1"},
                            output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}}))
    s = task.sampling
    assert (s.temperature, s.top_p, s.top_k) == (0.5, 0.9, 20)
    assert task.stop == ("END", "STOP") and task.stream is True and task.json_schema == {"type": "object"}
    assert (opts.stream, opts.stop_sequences, opts.user_id) == (True, ("END", "STOP"), "u-1")
    assert parse(body())[0].sampling == Sampling()  # the defaults stay when nothing is given


def _without(field: str) -> bytes:
    fields = {"model": "m", "max_tokens": 16, "messages": USER}
    del fields[field]
    return json.dumps(fields).encode()


INVALID, UNSUPPORTED = ErrorKind.INVALID_REQUEST, ErrorKind.UNSUPPORTED
BAD: list[tuple[str, bytes, str | None, ErrorKind]] = [
    ("malformed", b'{"model": "m", "messages": [', None, INVALID),
    ("no max_tokens", _without("max_tokens"), "max_tokens", INVALID),
    ("no model", _without("model"), "model", INVALID),
    ("no messages", _without("messages"), "messages", INVALID),
    ("empty messages", body(messages=[]), "messages", INVALID),
    ("max_tokens 0", body(max_tokens=0), "max_tokens", INVALID),
    ("bad role", body(messages=[{"role": "robot", "content": "x"}]), "messages", INVALID),
    ("image", body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]),
     "messages", UNSUPPORTED),
    ("document", body(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]),
     "messages", UNSUPPORTED),
    ("image in a tool result", body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]),
     "messages", UNSUPPORTED),
    ("unknown block", body(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages", INVALID),
    ("tool_use from the user", body(messages=[{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]), "messages", INVALID),
    ("tool_result from the assistant", body(messages=[{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]), "messages", INVALID),
    ("tool input not an object", body(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": "x"}]}]), "messages", INVALID),
    ("server tool", body(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]),
     "tools", UNSUPPORTED),
    ("tool without input_schema", body(tools=[{"name": "f"}]), "tools", INVALID),
    ("unknown tool_choice", body(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}),
     "tool_choice", INVALID),
    ("tool_choice without tools", body(tool_choice={"type": "any"}), "tool_choice", INVALID),
    ("bad tool_choice type", body(tools=[WEATHER], tool_choice={"type": "sometimes"}), "tool_choice",
     INVALID),
    ("small thinking budget", body(thinking={"type": "enabled", "budget_tokens": 100}), "thinking", INVALID),
    ("budget over max_tokens", body(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 2000}),
     "max_tokens", INVALID),
    ("unknown thinking", body(thinking={"type": "maybe"}), "thinking", INVALID),
    ("temperature over 1", body(temperature=1.5), "temperature", INVALID),
    ("negative top_k", body(top_k=-1), "top_k", INVALID),
    ("stop_sequences not a list", body(stop_sequences="END"), "stop_sequences", INVALID),
    ("mcp servers", body(mcp_servers=[{"type": "url", "url": "https://x", "name": "x"}]), "mcp_servers",
     UNSUPPORTED),
    ("system not text", body(system=[{"type": "image", "source": {}}]), "system", INVALID),
]


@pytest.mark.parametrize("name, raw, param, kind", BAD, ids=[b[0] for b in BAD])
def test_bad_request(name: str, raw: bytes, param: str | None, kind: ErrorKind) -> None:
    with pytest.raises(RequestInvalid) as info:
        parse(raw)
    assert info.value.param == param, info.value.message
    assert info.value.kind is kind, info.value.message
    assert anthropic_status(info.value.kind) == 400
    assert json.loads(anthropic_error_body(info.value.kind, info.value.message))["error"]["type"] == (
        "invalid_request_error")
    if param is not None:
        assert param in info.value.message


def test_missing_max_tokens_reads_like_anthropic() -> None:
    with pytest.raises(RequestInvalid) as info:
        parse(_without("max_tokens"))
    assert info.value.message == "max_tokens: Field required"
    parse_count_tokens(_without("max_tokens"))  # count_tokens takes no max_tokens
