"""Agents' APIs with the official clients on a real model (SmolLM2-135M-Instruct): tool calls
(forced and auto, streamed and not, a round trip), OpenAI's Responses API (events in order,
stored responses private to their key) and Anthropic's Messages API (create, stream, tools,
count_tokens). Forced calls are held to the tool's schema by a grammar, so a 135M model
answers with a valid call every time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.daemon import Daemon

KEY, OTHER = "sk-agents-one", "sk-agents-two"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
           isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("agents") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\napi_keys = ["{KEY}", "{OTHER}"]\n\n'
                      f'[models.smol]\nsource = "{smollm2_gguf}"\nn_ctx = 2048\n')
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


@pytest.fixture
def oai(agents: Daemon) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=agents.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def claude(agents: Daemon) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=agents.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


# ---- OpenAI chat completions: tools ---------------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_is_a_valid_call(oai: openai.OpenAI, choice: object) -> None:
    r = oai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice=choice,  # type: ignore[arg-type]
                                    max_tokens=80, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_a_streamed_tool_call_arrives_as_deltas(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[arg-type]
                                         max_tokens=80, temperature=0, stream=True)
    ids, names, args, reasons = [], [], [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            if call.id:
                ids.append(call.id)
            if call.function and call.function.name:
                names.append(call.function.name)
            if call.function and call.function.arguments:
                args.append(call.function.arguments)
        if chunk.choices[0].finish_reason:
            reasons.append(chunk.choices[0].finish_reason)
    assert len(ids) == 1 and names == ["get_weather"] and reasons == ["tool_calls"]
    assert "city" in json.loads("".join(args))


def test_a_tool_round_trip(oai: openai.OpenAI) -> None:
    first = oai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[arg-type]
                                        max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,  # type: ignore[union-attr]
                                                         "arguments": call.function.arguments}}]},  # type: ignore[union-attr]
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]
    second = oai.chat.completions.create(model="smol", messages=history, tools=[WEATHER], tool_choice="none",  # type: ignore[arg-type]
                                         max_tokens=40, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


# SmolLM2's template cannot render tools: they are described in a system message with a JSON
# reply format, and earlier calls are written into their turns in that format. Having called
# the tool twice before, the model (unconstrained under "auto") calls it again, and the call
# is parsed from its free text.
def _earlier_call(i: int, city: str) -> list[dict[str, object]]:
    return [{"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "Rainy, 12 degrees."}]


EARLIER_CALL = [{"role": "user", "content": "What is the weather in London?"}, *_earlier_call(1, "London"),
                {"role": "user", "content": "What is the weather in Berlin?"}, *_earlier_call(2, "Berlin"),
                {"role": "user", "content": "What is the weather in Paris?"}]


def test_an_auto_tool_call_is_parsed_from_what_the_model_chose(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="smol", messages=EARLIER_CALL, tools=[WEATHER],  # type: ignore[arg-type]
                                    tool_choice="auto", max_tokens=80, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    streamed = oai.chat.completions.create(model="smol", messages=EARLIER_CALL, tools=[WEATHER],  # type: ignore[arg-type]
                                           tool_choice="auto", max_tokens=80, temperature=0, stream=True)
    args = "".join(c.function.arguments or "" for chunk in streamed if chunk.choices  # type: ignore[union-attr]
                   for c in chunk.choices[0].delta.tool_calls or [])
    assert json.loads(args) == {"city": "Paris"}


def test_a_tool_choice_naming_an_unknown_function_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER],  # type: ignore[arg-type]
                                    tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "nope" in str(err.value)


# ---- the Responses API ----------------------------------------------------------------------

RESPONSE_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                 "parameters": WEATHER["function"]["parameters"]}  # type: ignore[index]


def test_responses_create_whole_and_chained(oai: openai.OpenAI, agents: Daemon) -> None:
    first = oai.responses.create(model="smol", input="Say hello.", max_output_tokens=16, temperature=0)
    assert first.status in ("completed", "incomplete") and first.output_text
    assert first.usage is not None and first.usage.input_tokens > 0
    second = oai.responses.create(model="smol", input="And now goodbye.", previous_response_id=first.id,
                                  max_output_tokens=16, temperature=0)
    assert second.usage is not None and second.usage.input_tokens > first.usage.input_tokens  # it saw turn 1
    assert oai.responses.retrieve(first.id).id == first.id
    with openai.OpenAI(base_url=agents.url + "/v1", api_key=OTHER, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(first.id)  # stored responses are private to their key
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="smol", input="hi", previous_response_id=first.id)
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)


def test_responses_stream_events_in_order(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="smol", input="Say hello.", max_output_tokens=16, stream=True,
                                       temperature=0))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.delta")
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))


def test_responses_with_a_function_tool(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="smol", input="What is the weather in Paris?", tools=[RESPONSE_TOOL],  # type: ignore[list-item]
                             tool_choice="required", parallel_tool_calls=False,
                             max_output_tokens=80, temperature=0)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert "city" in json.loads(calls[0].arguments)


# ---- Anthropic's Messages API ----------------------------------------------------------------

CLAUDE_TOOL = {"name": "get_weather", "description": "The weather in a city",
               "input_schema": WEATHER["function"]["parameters"]}  # type: ignore[index]


def test_messages_create_and_count_tokens(claude: anthropic.Anthropic) -> None:
    hello = [{"role": "user", "content": "Say hello."}]
    m = claude.messages.create(model="smol", max_tokens=16, messages=hello)  # type: ignore[arg-type]
    assert m.type == "message" and m.role == "assistant" and m.content[0].type == "text"
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens > 0
    count = claude.messages.count_tokens(model="smol", messages=[{"role": "user", "content": "Say hello."}])
    assert count.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_messages_stream_events_in_order(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="smol", max_tokens=16,
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    start, stop = kinds.index("content_block_start"), kinds.index("content_block_stop")
    assert start < stop < kinds.index("message_delta")
    assert final.content and final.content[0].type == "text"


def test_messages_tool_round_trip(claude: anthropic.Anthropic) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = claude.messages.create(model="smol", max_tokens=80, messages=ask, tools=[CLAUDE_TOOL],  # type: ignore[arg-type,list-item]
                               tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert m.stop_reason == "tool_use"
    use = next(b for b in m.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input, dict) and "city" in use.input
    # tool_choice none: the answer must be prose (with tools on, this small model sometimes
    # calls again, at random at Anthropic's default temperature of 1), and greedy.
    followup = claude.messages.create(model="smol", max_tokens=40, tools=[CLAUDE_TOOL],  # type: ignore[list-item]
                                      tool_choice={"type": "none"},
                                      messages=[*ask, {"role": "assistant", "content": m.content},  # type: ignore[list-item]
                                                {"role": "user", "content": [{
                                                    "type": "tool_result", "tool_use_id": use.id,
                                                    "content": "Sunny, 24 degrees."}]}],
                                      extra_body={"temperature": 0})
    assert followup.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in followup.content if b.type == "text")
    assert "24" in text or "sunny" in text.lower(), text  # the tool's result reached the model


def test_messages_errors_are_anthropics(claude: anthropic.Anthropic, agents: Daemon) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        claude.messages.create(model="no-such", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["type"] == "error"  # type: ignore[index]
    with anthropic.Anthropic(base_url=agents.url, api_key="sk-wrong-key", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(model="smol", max_tokens=4, messages=[{"role": "user", "content": "x"}])


# ---- resumable streams on the agents' routes --------------------------------------------------


@pytest.mark.parametrize(("path", "body", "last"), [
    # The end tokens are biased away: every answer runs to its token limit.
    ("/v1/responses", {"input": "Tell me a story.", "max_output_tokens": 48}, "response.incomplete"),
    ("/v1/messages", {"max_tokens": 48, "messages": [{"role": "user", "content": "Tell me a story."}]},
     "message_stop"),
])
def test_an_agents_stream_resumes_where_its_client_left(agents: Daemon, path: str, body: dict[str, object],
                                                         last: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "X-Conversation-Id": f"resume-{path}"}
    no_end = {"2": -100, "0": -100}
    request = {"model": "smol", "stream": True, "temperature": 0, "logit_bias": no_end, **body}
    got = b""
    with agents.client() as c, c.stream("POST", path, json=request, headers=headers) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            got += chunk
            if got.count(b"\n\n") >= 4:
                break  # the client goes away mid-stream
    with agents.client() as c:
        rest = c.get("/v1/stream", params={"conv_id": f"resume-{path}", "from": len(got)},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert rest.status_code == 200, rest.text
    whole = (got + rest.content).decode()
    events = [ln[7:] for ln in whole.splitlines() if ln.startswith("event: ")]
    data = [json.loads(ln[6:]) for ln in whole.splitlines() if ln.startswith("data: ")]
    assert events[-1] == last and events.count(events[0]) == 1  # whole, and nothing sent twice
    assert [d["type"] for d in data] == events
    if path == "/v1/responses":
        assert [d["sequence_number"] for d in data] == list(range(len(data)))


PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_a_final_assistant_message_is_continued_not_answered(oai: openai.OpenAI, claude: anthropic.Anthropic,
                                                             agents: Daemon) -> None:
    """Prefill, as llama-server does unasked and vLLM with continue_final_message: the prompt
    ends with the assistant's words and the answer carries only what comes after them."""
    prefill = "The capital of France is"
    messages = [*PARIS, {"role": "assistant", "content": prefill}]
    r = oai.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    text = r.choices[0].message.content or ""
    assert "Paris" in text and not text.lstrip().startswith("The capital")
    with agents.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        prompt = c.post("/apply-template", json={"model": "smol", "messages": messages}).json()["prompt"]
        plain = c.post("/apply-template", json={"model": "smol", "messages": PARIS}).json()["prompt"]
    assert prompt == plain + prefill  # no end of turn after it, no new assistant turn
    m = claude.messages.create(model="smol", max_tokens=8, messages=messages,  # type: ignore[arg-type]
                               extra_body={"temperature": 0})  # the 2.x client has no temperature
    block = m.content[0]
    assert block.type == "text" and "Paris" in block.text
    assert not block.text.lstrip().startswith("The capital")
    explicit = oai.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                           extra_body={"continue_final_message": True,
                                                       "add_generation_prompt": False})
    assert explicit.choices[0].message.content == text


@pytest.mark.parametrize(("extra", "messages", "says"), [
    ({"continue_final_message": True}, [*PARIS, {"role": "assistant", "content": "The"}],
     "Cannot set both add_generation_prompt and continue_final_message"),
    ({}, [*PARIS, {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}],
     "Cannot have 2 or more assistant messages at the end"),
    ({"continue_final_message": True, "add_generation_prompt": False}, PARIS,
     "needs the messages to end with an assistant message"),
])
def test_a_continuation_that_cannot_be_is_a_400(oai: openai.OpenAI, extra: dict[str, object],
                                               messages: list[dict[str, str]], says: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="smol", messages=messages, max_tokens=4, extra_body=extra)  # type: ignore[arg-type]
    assert says in err.value.message
