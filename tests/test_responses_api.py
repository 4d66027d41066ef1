"""worker.responses_api: requests parsed into Tasks, and the rendered bytes checked against
the official openai client: every stream event and Response strictly validated with its
types (no missing field, no unknown key), and the bytes fed to the client's own stream
accumulator and non-streaming parser through a mock HTTP transport."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx2
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses.input_token_count_response import InputTokenCountResponse
from pydantic import TypeAdapter

from protocol.errors import ErrorKind
from worker.outputs import Delta, Finish, Reasoning, Text, Timings, ToolCallArgs, ToolCallBegin, Usage
from worker.responses_api import (
    ResponsesOptions,
    history_messages,
    input_tokens_body,
    parse,
    with_history,
)
from worker.responses_render import ResponsesRenderer
from worker.schema import RequestInvalid
from worker.task import Message, Sampling, ToolCall, ToolChoice

EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
RESPONSE = TypeAdapter(Response)
TIMINGS = Timings(prompt_n=8, prompt_ms=4.0, predicted_n=5, predicted_ms=10.0, cache_n=4)


def finish(reason: str = "stop", prompt: int = 12, completion: int = 5, cached: int = 4,
           reasoning: int = 0, tool_calls: int = 0) -> Finish:
    return Finish(reason, Usage(prompt, completion, cached, reasoning), TIMINGS, tool_calls=tool_calls)


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


# Keys OpenAI sends that openai 3.57's types do not declare.
KNOWN_EXTRA = {"store"}


def assert_no_extra(value: object, path: str = "$") -> None:
    """Every key we sent is a field of the client's type: a misspelt key would pass
    validation (the types allow extras) and silently be missing."""
    if isinstance(value, pydantic.BaseModel):
        extra = set(value.model_extra or ()) - KNOWN_EXTRA
        assert not extra, f"{path}: keys unknown to the client: {sorted(extra)}"
        for name in type(value).model_fields:
            assert_no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            assert_no_extra(item, f"{path}[{i}]")


def validate_response(raw: bytes) -> Response:
    response = RESPONSE.validate_python(json.loads(raw), strict=True)
    assert_no_extra(response)
    return response


def events(raw: bytes) -> list[dict[str, Any]]:
    """Split SSE bytes into events: each `event:` line names its data's type, strictly
    validated as an openai ResponseStreamEvent; sequence numbers count from 0."""
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw[:-2].split(b"\n\n"):
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: ")
        payload = json.loads(data[len(b"data: "):])
        assert payload["type"] == name[len(b"event: "):].decode()
        assert_no_extra(EVENT.validate_python(payload, strict=True))
        out.append(payload)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def render(deltas: Sequence[Delta], fin: Finish, options: ResponsesOptions | None = None,
           ) -> tuple[bytes, ResponsesRenderer]:
    r = ResponsesRenderer("tiny", options or ResponsesOptions(model="tiny"))
    return r.start() + b"".join(r.delta(d) for d in deltas) + r.finish(fin), r


def client(payload: bytes, stream: bool = True, status: int = 200) -> openai.OpenAI:
    kind = "text/event-stream" if stream else "application/json"

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=payload, headers={"content-type": kind})

    return openai.OpenAI(api_key="sk-test", base_url="http://modelherd.test/v1", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


def summary(response: Response) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for item in response.output:
        if item.type == "message":
            text = "".join(c.text for c in item.content if c.type == "output_text")
            out.append(("message", item.status, text))
        elif item.type == "reasoning":
            out.append(("reasoning", str(item.status), "".join(c.text for c in item.content or ())))
        elif item.type == "function_call":
            out.append(("function_call", str(item.status), item.call_id, item.name, item.arguments))
        else:
            raise AssertionError(f"unexpected output item {item.type}")
    return out


ARGS = ['{"loc', 'ation": "Pa', 'ris"}']
SCENARIOS: dict[str, tuple[list[Delta], Finish, list[tuple[str, ...]]]] = {
    "text": ([Text("Hel"), Text("lo"), Text(" world")], finish(),
             [("message", "completed", "Hello world")]),
    "reasoning_then_text": ([Reasoning("Let me "), Reasoning("think."), Text("Hi"), Text("!")],
                            finish(reasoning=3),
                            [("reasoning", "completed", "Let me think."), ("message", "completed", "Hi!")]),
    "tool_call_args_in_pieces": (
        [ToolCallBegin(0, "call_abc", "get_weather"), *[ToolCallArgs(0, a) for a in ARGS]],
        finish("tool_calls", tool_calls=1),
        [("function_call", "completed", "call_abc", "get_weather", '{"location": "Paris"}')]),
    "parallel_tool_calls": (
        [Text("Checking both."), ToolCallBegin(0, "call_a", "get_weather"), ToolCallArgs(0, '{"city":'),
         ToolCallArgs(0, '"Paris"}'), ToolCallBegin(1, "call_b", "get_time"), ToolCallArgs(1, "{}")],
        finish("tool_calls", tool_calls=2),
        [("message", "completed", "Checking both."),
         ("function_call", "completed", "call_a", "get_weather", '{"city":"Paris"}'),
         ("function_call", "completed", "call_b", "get_time", "{}")]),
    "interleaved_thinking": (
        [Reasoning("a"), ToolCallBegin(0, "call_1", "f"), ToolCallArgs(0, "{}"), Reasoning("b"),
         Text("done")],
        finish("tool_calls", tool_calls=1),
        [("reasoning", "completed", "a"), ("function_call", "completed", "call_1", "f", "{}"),
         ("reasoning", "completed", "b"), ("message", "completed", "done")]),
}


# ---------------------------------------------------------------- rendering


def test_text_stream_event_order() -> None:
    raw, r = render([Text("Hel"), Text("lo")], finish())
    evs = events(raw)
    assert [e["type"] for e in evs] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    for e in evs[:2]:
        assert e["response"]["status"] == "in_progress" and e["response"]["output"] == []
        assert e["response"]["usage"] is None
    assert {e["response"]["id"] for e in (evs[0], evs[1], evs[-1])} == {r.id}
    assert r.id.startswith("resp_")
    item_id = evs[2]["item"]["id"]
    assert item_id.startswith("msg_")
    assert all(e["item_id"] == item_id and e["output_index"] == 0 for e in evs[3:8])
    assert evs[2]["item"] == {"type": "message", "id": item_id, "status": "in_progress",
                              "role": "assistant", "content": []}
    assert [e["delta"] for e in evs[4:6]] == ["Hel", "lo"]
    assert evs[6]["text"] == "Hello"
    assert evs[8]["item"]["status"] == "completed"
    final = evs[-1]["response"]
    assert final["status"] == "completed" and final["completed_at"] is not None
    assert final["usage"] == {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4,
                              "cache_write_tokens": 0}, "output_tokens": 5,
                              "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 17}
    assert json.loads(r.response_bytes()) == final  # what GET /v1/responses/{id} serves


def test_reasoning_event_order() -> None:
    evs = events(render([Reasoning("hm"), Text("Hi")], finish(reasoning=1))[0])
    assert [e["type"] for e in evs[2:-1]] == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert evs[2]["item"]["type"] == "reasoning" and evs[2]["item"]["id"].startswith("rs_")
    assert evs[3]["part"] == {"type": "reasoning_text", "text": ""}
    assert evs[7]["item"]["content"] == [{"type": "reasoning_text", "text": "hm"}]
    assert (evs[2]["output_index"], evs[8]["output_index"]) == (0, 1)
    assert evs[-1]["response"]["usage"]["output_tokens_details"] == {"reasoning_tokens": 1}


def test_tool_call_events_and_ids() -> None:
    deltas: list[Delta] = [ToolCallBegin(0, "call_abc", "f"), ToolCallArgs(0, '{"a"'), ToolCallArgs(0, ":1}"),
                           ToolCallBegin(1, "xyz", "g"), ToolCallBegin(2, "", "h")]
    evs = events(render(deltas, finish("tool_calls", tool_calls=3))[0])
    assert [e["type"] for e in evs[2:7]] == [
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done"]
    assert evs[2]["item"] == {"type": "function_call", "id": "fc_abc", "call_id": "call_abc", "name": "f",
                              "arguments": "", "status": "in_progress"}
    assert evs[5]["arguments"] == '{"a":1}'
    calls = [i for i in evs[-1]["response"]["output"]]
    assert [(c["id"], c["call_id"]) for c in calls[:2]] == [("fc_abc", "call_abc"), ("fc_xyz", "xyz")]
    assert calls[2]["call_id"].startswith("call_") and calls[2]["id"] == "fc_" + calls[2]["call_id"][5:]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_client_accumulates_the_stream_and_parses_the_body(name: str) -> None:
    deltas, fin, expected = SCENARIOS[name]
    raw, r = render(deltas, fin)
    events(raw)
    with client(raw).responses.stream(model="tiny", input="hi") as stream:
        seen = [e.type for e in stream]
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert summary(final) == expected
    assert final.id == r.id and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == fin.usage.completion_tokens
    texts = [s[2] for s in expected if s[0] == "message"]
    assert final.output_text == "".join(texts)

    whole = ResponsesRenderer("tiny", ResponsesOptions(model="tiny")).body(deltas, fin)
    validate_response(whole)
    created = client(whole, stream=False).responses.create(model="tiny", input="hi")
    assert summary(created) == expected
    assert created.output_text == final.output_text
    assert created.usage == final.usage


def test_plain_stream_iteration_gives_typed_events() -> None:
    raw, _ = render(SCENARIOS["parallel_tool_calls"][0], SCENARIOS["parallel_tool_calls"][1])
    got = list(client(raw).responses.create(model="tiny", input="hi", stream=True))
    assert [e.type for e in got] == [e["type"] for e in events(raw)]
    assert [e.sequence_number for e in got] == list(range(len(got)))


@pytest.mark.parametrize("deltas, last", [
    ([Text("Hello"), Text(" wor")], ("message", "incomplete", "Hello wor")),
    ([ToolCallBegin(0, "call_1", "f"), ToolCallArgs(0, '{"a": ')],
     ("function_call", "incomplete", "call_1", "f", '{"a": ')),
])
def test_length_finish_is_incomplete(deltas: list[Delta], last: tuple[str, ...]) -> None:
    raw, _ = render(deltas, finish("length"))
    evs = events(raw)
    assert evs[-1]["type"] == "response.incomplete"
    assert evs[-2]["type"] == "response.output_item.done" and evs[-2]["item"]["status"] == "incomplete"
    resp = evs[-1]["response"]
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["completed_at"] is None
    with client(raw).responses.stream(model="tiny", input="hi") as stream:
        got = list(stream)
    assert got[-1].type == "response.incomplete"
    assert summary(got[-1].response) == [last]
    whole = validate_response(ResponsesRenderer("tiny", ResponsesOptions(model="tiny")).body(deltas,
                                                                                              finish("length")))
    assert whole.status == "incomplete" and summary(whole) == [last]
    assert whole.incomplete_details is not None and whole.incomplete_details.reason == "max_output_tokens"


def test_no_output_at_all() -> None:
    raw, _ = render([Text("")], finish(completion=0))
    evs = events(raw)
    assert [e["type"] for e in evs] == ["response.created", "response.in_progress", "response.completed"]
    assert evs[-1]["response"]["output"] == []


@pytest.mark.parametrize("kind, code", [(ErrorKind.INTERNAL, "server_error"),
                                        (ErrorKind.RATE_LIMITED, "rate_limit_exceeded"),
                                        (ErrorKind.CONTEXT_LENGTH_EXCEEDED, "invalid_prompt")])
def test_failure_mid_stream(kind: ErrorKind, code: str) -> None:
    r = ResponsesRenderer("tiny", ResponsesOptions(model="tiny"))
    evs = events(r.start() + r.delta(Text("Hi")) + r.fail(kind, "boom"))
    assert [e["type"] for e in evs[-3:]] == ["response.content_part.done", "response.output_item.done",
                                              "response.failed"]
    assert evs[-2]["item"]["status"] == "incomplete"
    failed = evs[-1]["response"]
    assert failed["status"] == "failed" and failed["error"] == {"code": code, "message": "boom"}
    assert json.loads(r.response_bytes()) == failed


def test_arguments_for_a_call_that_is_not_open_are_refused() -> None:
    r = ResponsesRenderer("tiny", ResponsesOptions(model="tiny"))
    r.start()
    r.delta(ToolCallBegin(0, "call_a", "f"))
    r.delta(ToolCallBegin(1, "call_b", "g"))
    with pytest.raises(ValueError, match="tool call 0"):
        r.delta(ToolCallArgs(0, "{}"))


def test_response_echoes_the_request() -> None:
    req = body(
        input="hi", instructions="Be terse.", max_output_tokens=64, temperature=0.3, top_p=0.9,
        tools=[{"type": "function", "name": "get_weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": False}],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True},
              "verbosity": "low"},
        reasoning={"effort": "high", "summary": "auto"}, store=False, previous_response_id="resp_prev",
        metadata={"k": "v"}, user="u1", truncation="auto", safety_identifier="s", prompt_cache_key="p")
    _, options = parse(req)
    r = ResponsesRenderer("tiny", options)
    resp = validate_response(r.body([Text("{}")], finish()))
    assert resp.model == "tiny" and resp.instructions == "Be terse."
    assert resp.max_output_tokens == 64 and resp.temperature == 0.3 and resp.top_p == 0.9
    echo = resp.model_dump(mode="json", exclude_none=True)
    assert echo["tools"] == [{"type": "function", "name": "get_weather", "description": "Weather now",
                              "strict": False,
                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    assert echo["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert resp.parallel_tool_calls is False
    assert resp.text is not None and resp.text.format is not None and resp.text.format.type == "json_schema"
    assert resp.text.verbosity == "low"
    assert resp.reasoning is not None and resp.reasoning.effort == "high"
    assert (echo["store"], resp.previous_response_id, resp.metadata) == (False, "resp_prev", {"k": "v"})
    assert (resp.user, resp.truncation) == ("u1", "auto")
    assert (resp.safety_identifier, resp.prompt_cache_key) == ("s", "p")


def test_default_echo_validates() -> None:
    _, options = parse(body(input="hi"))
    resp = validate_response(ResponsesRenderer("tiny", options).body([Text("x")], finish()))
    assert resp.tool_choice == "auto" and resp.tools == [] and resp.model_dump()["store"] is True
    assert resp.text is not None and resp.text.format is not None and resp.text.format.type == "text"


def test_input_tokens_answer() -> None:
    raw = input_tokens_body(42)
    assert_no_extra(TypeAdapter(InputTokenCountResponse).validate_python(json.loads(raw), strict=True))
    got = client(raw, stream=False).responses.input_tokens.count(model="tiny", input="hi")
    assert (got.object, got.input_tokens) == ("response.input_tokens", 42)


def test_retrieve_serves_the_stored_body() -> None:
    _, r = render(SCENARIOS["reasoning_then_text"][0], SCENARIOS["reasoning_then_text"][1])
    got = client(r.response_bytes(), stream=False).responses.retrieve(r.id)
    assert got.id == r.id and summary(got) == SCENARIOS["reasoning_then_text"][2]


def test_response_bytes_before_finish_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        ResponsesRenderer("tiny", ResponsesOptions(model="tiny")).response_bytes()


# ---------------------------------------------------------------- parsing


def test_string_input_and_instructions() -> None:
    task, options = parse(body(input="Hello", instructions="Be terse."))
    assert task.messages == (Message("system", "Be terse."), Message("user", "Hello"))
    assert options.instructions == "Be terse." and options.model == "m"
    assert (options.stream, options.store, options.previous_response_id) == (False, True, None)
    assert (task.max_tokens, task.json_schema, task.json_object) == (None, None, False)
    assert task.reasoning.enabled is None


def test_every_item_form() -> None:
    items = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Weather"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": " in "},
                                                        {"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "tool"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}',
         "id": "fc_1", "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "22C"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Summed up."}]},
        {"role": "assistant", "content": "22C at noon."},
        {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "system", "content": "Later system note."},
        {"role": "user", "content": "Thanks"},
    ]
    task, _ = parse(body(input=items))
    assert task.messages == (
        Message("system", "Be terse."),
        Message("user", "Weather"),
        Message("user", " in Paris?"),
        Message("assistant", "Checking.", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),
                                                      ToolCall("call_2", "get_time", "{}")),
                reasoning_content="tool"),
        Message("tool", "22C", tool_call_id="call_1"),
        Message("tool", "noon", tool_call_id="call_2"),
        Message("assistant", "22C at noon.No.", reasoning_content="Summed up."),
        Message("system", "Later system note."),
        Message("user", "Thanks"),
    )


def test_text_after_calls_starts_a_new_assistant_message() -> None:
    items = [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
             {"role": "assistant", "content": "after"}]
    task, _ = parse(body(input=items))
    assert task.messages == (Message("assistant", "", tool_calls=(ToolCall("c", "f", "{}"),)),
                             Message("assistant", "after"))


WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
TIME = {"type": "function", "name": "get_time", "description": "Now", "strict": False}


def test_tools_are_flat_function_tools() -> None:
    task, options = parse(body(input="x", tools=[WEATHER, TIME]))
    assert [(t.name, t.description, t.parameters, t.strict) for t in task.tools] == [
        ("get_weather", "", {"type": "object"}, True), ("get_time", "Now", {}, False)]
    assert task.tool_choice == ToolChoice("auto") and task.parallel_tool_calls is True
    assert [t.name for t in options.tools] == ["get_weather", "get_time"]


@pytest.mark.parametrize("choice, expected, offered", [
    ("none", ToolChoice("none"), ["get_weather", "get_time"]),
    ("auto", ToolChoice("auto"), ["get_weather", "get_time"]),
    ("required", ToolChoice("required"), ["get_weather", "get_time"]),
    ({"type": "function", "name": "get_time"}, ToolChoice("named", "get_time"), ["get_weather", "get_time"]),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]},
     ToolChoice("required"), ["get_time"]),
])
def test_tool_choice(choice: Any, expected: ToolChoice, offered: list[str]) -> None:
    task, options = parse(body(input="x", tools=[WEATHER, TIME], tool_choice=choice,
                               parallel_tool_calls=False))
    assert task.tool_choice == expected and [t.name for t in task.tools] == offered
    assert task.parallel_tool_calls is False
    assert [t.name for t in options.tools] == ["get_weather", "get_time"]  # echoed whole
    echoed = validate_response(ResponsesRenderer("tiny", options).body([Text("x")], finish()))
    assert echoed.model_dump(mode="json", exclude_none=True)["tool_choice"] == choice


def test_sampling_and_formats() -> None:
    task, _ = parse(body(input="x", max_output_tokens=77, temperature=0.2, top_p=0.5, stream=True,
                         text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}))
    assert (task.max_tokens, task.sampling.temperature, task.sampling.top_p) == (77, 0.2, 0.5)
    assert task.stream is True
    assert task.json_schema == {"type": "object"} and task.json_object is False
    task, _ = parse(body(input="x", text={"format": {"type": "json_object"}}))
    assert task.json_object is True and task.json_schema is None
    assert parse(body(input="x"))[0].sampling == Sampling()  # the defaults stay when nothing is given


@pytest.mark.parametrize("effort, enabled", [("none", False), ("minimal", False), ("low", True),
                                             ("medium", True), ("high", True), ("xhigh", True), ("max", True),
                                             (None, None)])
def test_reasoning_effort(effort: str | None, enabled: bool | None) -> None:
    task, options = parse(body(input="x", reasoning={"effort": effort}))
    assert task.reasoning.enabled is enabled
    echoed = validate_response(ResponsesRenderer("tiny", options).body([Text("x")], finish()))
    assert echoed.reasoning is not None and echoed.reasoning.effort == effort


def test_previous_response_chain_is_rebuilt() -> None:
    req_a = body(input="Weather in Paris?", instructions="A's instructions", tools=[WEATHER])
    _, opts_a = parse(req_a)
    resp_a = ResponsesRenderer("tiny", opts_a).body(
        [Reasoning("need it"), ToolCallBegin(0, "call_1", "get_weather"),
         ToolCallArgs(0, '{"city":"Paris"}')],
        finish("tool_calls", tool_calls=1))
    req_b = body(previous_response_id="resp_a", input=[
        {"type": "function_call_output", "call_id": "call_1", "output": "22C"}])
    _, opts_b = parse(req_b)
    resp_b = ResponsesRenderer("tiny", opts_b).body([Text("It is 22C.")], finish())
    req_c = body(previous_response_id="resp_b", instructions="C's instructions", input="Thanks!")
    task_c, opts_c = parse(req_c)
    assert opts_c.previous_response_id == "resp_b"

    history = history_messages([(req_a, resp_a), (req_b, resp_b)])
    assert with_history(task_c, opts_c, history).messages == (
        Message("system", "C's instructions"),
        Message("user", "Weather in Paris?"),
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),),
                reasoning_content="need it"),
        Message("tool", "22C", tool_call_id="call_1"),
        Message("assistant", "It is 22C."),
        Message("user", "Thanks!"),
    )
    task_b, _ = parse(req_b)  # no instructions: the history goes first
    rebuilt = with_history(task_b, opts_b, history_messages([(req_a, resp_a)])).messages
    assert rebuilt is not None and rebuilt[0] == Message("user", "Weather in Paris?")


def test_input_may_be_left_to_the_previous_response() -> None:
    task, options = parse(body(previous_response_id="resp_x"))
    assert task.messages == () and options.previous_response_id == "resp_x"


INVALID, UNSUPPORTED = ErrorKind.INVALID_REQUEST, ErrorKind.UNSUPPORTED
BAD: list[tuple[str, bytes, str | None, ErrorKind]] = [
    ("malformed", b'{"model": "m", "input": [', None, INVALID),
    ("not an object", b"[1]", None, INVALID),
    ("model not a string", json.dumps({"model": 3, "input": "x"}).encode(), "model", INVALID),
    ("no input", body(), "input", INVALID),
    ("input not a list", body(input=3), "input", INVALID),
    ("bad role", body(input=[{"role": "robot", "content": "x"}]), "input", INVALID),
    ("call without call_id", body(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "input",
     INVALID),
    ("image", body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/i.png"}]}]),
     "input", UNSUPPORTED),
    ("file", body(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input",
     UNSUPPORTED),
    ("refusal from the user",
     body(input=[{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]), "input", INVALID),
    ("unknown part", body(input=[{"role": "user", "content": [{"type": "input_video"}]}]), "input", INVALID),
    ("item_reference", body(input=[{"type": "item_reference", "id": "msg_1"}]), "input", UNSUPPORTED),
    ("web_search_call item", body(input=[{"type": "web_search_call", "id": "ws_1"}]), "input", UNSUPPORTED),
    ("web_search tool", body(input="x", tools=[{"type": "web_search"}]), "tools", UNSUPPORTED),
    ("custom tool", body(input="x", tools=[{"type": "custom", "name": "c"}]), "tools", UNSUPPORTED),
    ("nested tool shape", body(input="x", tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     INVALID),
    ("hosted tool_choice", body(input="x", tools=[WEATHER], tool_choice={"type": "file_search"}),
     "tool_choice", UNSUPPORTED),
    ("unknown named tool", body(input="x", tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}),
     "tool_choice", INVALID),
    ("required without tools", body(input="x", tool_choice="required"), "tool_choice", INVALID),
    ("bad tool_choice string", body(input="x", tool_choice="sometimes"), "tool_choice", INVALID),
    ("allowed unknown tool", body(input="x", tools=[WEATHER], tool_choice={
        "type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "nope"}]}),
     "tool_choice", INVALID),
    ("background", body(input="x", background=True), "background", UNSUPPORTED),
    ("conversation", body(input="x", conversation="conv_1"), "conversation", UNSUPPORTED),
    ("prompt template", body(input="x", prompt={"id": "pmpt_1"}), "prompt", UNSUPPORTED),
    ("top_logprobs", body(input="x", top_logprobs=3), "top_logprobs", UNSUPPORTED),
    ("include logprobs", body(input="x", include=["message.output_text.logprobs"]), "include", UNSUPPORTED),
    ("temperature", body(input="x", temperature=2.5), "temperature", INVALID),
    ("top_p", body(input="x", top_p=1.5), "top_p", INVALID),
    ("max_output_tokens", body(input="x", max_output_tokens=0), "max_output_tokens", INVALID),
    ("json_schema without name", body(input="x", text={"format": {"type": "json_schema", "schema": {}}}),
     "text", INVALID),
    ("unknown format", body(input="x", text={"format": {"type": "yaml"}}), "text", INVALID),
    ("effort", body(input="x", reasoning={"effort": "extreme"}), "reasoning", INVALID),
    ("truncation", body(input="x", truncation="sometimes"), "truncation", INVALID),
    ("metadata", body(input="x", metadata={str(i): "v" for i in range(17)}), "metadata", INVALID),
    ("stream", body(input="x", stream="yes"), "stream", INVALID),
]


@pytest.mark.parametrize("name, raw, param, kind", BAD, ids=[b[0] for b in BAD])
def test_bad_request(name: str, raw: bytes, param: str | None, kind: ErrorKind) -> None:
    with pytest.raises(RequestInvalid) as info:
        parse(raw)
    assert info.value.param == param, info.value.message
    assert info.value.kind is kind, info.value.message
    assert info.value.kind.status == 400
    if param is not None:
        assert param in info.value.message


def test_nested_errors_give_the_path_from_the_root() -> None:
    with pytest.raises(RequestInvalid) as info:
        parse(body(input=[{"role": "user", "content": "ok"}, {"role": "user", "content": 5}]))
    assert "`$.input[1].content`" in info.value.message
