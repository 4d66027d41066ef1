"""Which tool-call syntax a model writes, told from its Jinja chat template.

Like llama.cpp's per-format handlers (before its template-diffing autoparser), the choice
is made by looking for each family's marker text in the template source. The result also
says how the model marks its thinking and what the template expects to be given besides
`messages`, so one value carries all the engine needs about a model's output format.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from worker.task import Message, Tool


class Syntax(enum.Enum):
    HERMES = "hermes"  # <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes 2/3, Qwen 2.5/3)
    QWEN_XML = "qwen_xml"  # <tool_call><function=f><parameter=p>v</parameter></function> (Qwen3-Coder, 3.5)
    LLAMA3 = "llama3"  # {"name": ..., "parameters": {...}}, maybe after <|python_tag|> (Llama 3.1-3.3)
    MISTRAL = "mistral"  # [TOOL_CALLS][{...}] (Nemo) or [TOOL_CALLS]f[CALL_ID]id[ARGS]{...} (Small 3.2...)
    DEEPSEEK_R1 = "deepseek_r1"  # <tool calls begin> function<tool sep>f\n```json\n{...}``` (R1 distills)
    GPT_OSS = "gpt_oss"  # harmony channels: <|channel|>commentary to=functions.f<|message|>{...}
    GENERIC = "generic"  # {"tool_call": {...}} / {"tool_calls": [...]} / {"response": "..."}, or a bare call


class MistralCalls(enum.Enum):
    """How a Mistral template writes calls (and so how a grammar must force them)."""

    ARRAY = "array"  # [TOOL_CALLS][{"name": f, "arguments": {...}, "id": "abcdefghi"}]
    NAMED = "named"  # [TOOL_CALLS]f[ARGS]{...}
    NAMED_ID = "named_id"  # [TOOL_CALLS]f[CALL_ID]abcdefghi[ARGS]{...}


@dataclass(frozen=True)
class ToolFormat:
    syntax: Syntax
    # Reasoning markers the output is read for, or None (gpt-oss uses channels instead).
    think: tuple[str, str] | None = ("<think>", "</think>")
    # The template itself writes those markers: the model is trained to think (grammars allow it).
    thinks: bool = False
    mistral: MistralCalls = MistralCalls.ARRAY
    # Llama 3.1/3.3 templates render "builtin" tools as <|python_tag|>name.call(arg="...").
    python_tag_calls: bool = False
    # Ids the template accepts back in history: Mistral's raise unless they are 9 alphanumerics.
    id_pattern: str = r"\S+"
    # The template writes the tool list itself; when False, describe the tools in a system message.
    renders_tools: bool = True
    # Whether the template can render several calls in one assistant message.
    parallel: bool = True
    # The template renders history calls' `arguments` with `| tojson` or `| items`: pass them as
    # parsed objects, not JSON text (text would come out quoted, or fail), as llama.cpp does.
    object_arguments: bool = False


_THINK = ("<think>", "</think>")
_MISTRAL_THINK = ("[THINK]", "[/THINK]")


def deepseek_token(words: str) -> str:
    """A DeepSeek special token such as <|tool calls begin|>, with its full-width bars and
    U+2581 for spaces (written escaped here: they look like '|' and '_')."""
    return "<\uff5c" + words.replace(" ", "\u2581") + "\uff5c>"


# The markers DeepSeek R1 distills are seen to open their tool-call section with (llama.cpp accepts all).
DEEPSEEK_CALLS_BEGIN = (
    deepseek_token("tool calls begin"), "<\uff5ctool_calls_begin\uff5c>", "<\uff5ctool calls begin\uff5c>",
    "<\uff5ctool\\_calls\\_begin\uff5c>", deepseek_token("tool calls"),
)
# Tools that Llama 3.1's template renders as builtins (and the one argument each must have).
LLAMA_BUILTINS = {"brave_search": "query", "wolfram_alpha": "query", "web_search": "query",
                  "python": "code", "code_interpreter": "code"}


def detect_format(chat_template: str | None) -> ToolFormat:
    """The tool-call syntax of the model whose chat template this is (GENERIC when unknown)."""
    src = chat_template or ""
    return replace(_detect(src), object_arguments=bool(_OBJECT_ARGUMENTS.search(src)))


# `tool_call.arguments | tojson`, `['arguments']|tojson`, `tool_args | tojson`, `arguments|items`,
# Nemo's `function|tojson`.
_OBJECT_ARGUMENTS = re.compile(
    r"""(?:arguments|args)['"]?\]?\s*\|\s*(?:tojson|items)|function\s*\|\s*tojson""")


def _detect(src: str) -> ToolFormat:
    thinks = "<think>" in src or "</think>" in src
    renders = bool(re.search(r"\btools\b", src))
    if "<|channel|>" in src:
        return ToolFormat(Syntax.GPT_OSS, think=None, parallel=False)
    if DEEPSEEK_CALLS_BEGIN[0] in src:
        return ToolFormat(Syntax.DEEPSEEK_R1, thinks=thinks, renders_tools=renders)
    if "<tool_call>" in src and "<function=" in src and "<parameter=" in src:
        return ToolFormat(Syntax.QWEN_XML, thinks=thinks)
    if "<tool_call>" in src:
        return ToolFormat(Syntax.HERMES, thinks=thinks)
    if "<|start_header_id|>ipython<|end_header_id|>" in src:
        # The template raises on more than one call per assistant message.
        return ToolFormat(Syntax.LLAMA3, python_tag_calls="<|python_tag|>" in src, parallel=False)
    if "[TOOL_CALLS]" in src:
        calls = (MistralCalls.NAMED_ID if "[CALL_ID]" in src
                 else MistralCalls.NAMED if "[ARGS]" in src else MistralCalls.ARRAY)
        # Nemo's and Small 3.2's templates raise_exception() unless ids are 9 alphanumerics.
        return ToolFormat(Syntax.MISTRAL, think=_MISTRAL_THINK, thinks="[THINK]" in src, mistral=calls,
                          id_pattern=r"[A-Za-z0-9]{9}")
    return ToolFormat(Syntax.GENERIC, thinks=thinks, renders_tools=renders)


def openai_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """The tool list as chat templates expect it: OpenAI's `tools` shape, as llama.cpp passes it
    (`strict` dropped; missing description "" and parameters {})."""
    return [{"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools]


def template_tools(fmt: ToolFormat, tools: Sequence[Tool]) -> dict[str, Any]:
    """The Jinja variables to render the template with when the request has tools.

    Every supported template reads OpenAI's `tools` list (Hermes and Qwen templates accept the
    flat or the nested shape; Mistral Nemo's iterates `tool.function`, so it must be nested).
    Llama 3.1/3.3 also take `builtin_tools`: the tools it should call with <|python_tag|>.
    Messages too differ: `fmt.object_arguments` templates want history calls' arguments as
    objects; gpt-oss reads reasoning from a message's `thinking`, not `reasoning_content`;
    Mistral's want call ids of 9 alphanumerics (`fmt.id_pattern`).
    """
    out: dict[str, Any] = {"tools": openai_tools(tools)}
    if fmt.python_tag_calls:
        builtins = [t.name for t in tools if _is_builtin(t)]
        if builtins:
            out["builtin_tools"] = builtins
    return out


def _is_builtin(tool: Tool) -> bool:
    arg = LLAMA_BUILTINS.get(tool.name)
    props = tool.parameters.get("properties")
    return arg is not None and isinstance(props, dict) and set(props) == {arg}


def calls_as_text(messages: Sequence[Message]) -> tuple[Message, ...]:
    """History for a template that cannot render an assistant turn's tool calls: each such
    turn's calls written into its text in the JSON shape tools_system_prompt asks for (as
    llama.cpp's template polyfill does), so the model sees what it called."""
    out = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.name, "arguments": _parsed(c.arguments)} for c in m.tool_calls]
            body = {"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls}
            text = json.dumps(body, ensure_ascii=False)
            m = replace(m, content=f"{m.content}\n{text}" if m.content else text, tool_calls=())
        out.append(m)
    return tuple(out)


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:  # not JSON: shown as the text it is
        return arguments


def tools_system_prompt(tools: Sequence[Tool], parallel: bool) -> str:
    """For a template that does not render tools (GENERIC): the system text that describes them
    and the JSON reply format the parser reads (after llama.cpp's generic handler)."""
    shape = ('{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}, ...]}' if parallel
             else '{"tool_call": {"name": "<function name>", "arguments": {<arguments>}}}')
    return ("You can call the following tools:\n"
            + "\n".join(json.dumps(t, ensure_ascii=False) for t in openai_tools(tools))
            + "\n\nRespond in JSON format, either with " + shape
            + ' to call tools, or with {"response": "<your reply>"} to reply to the user.')
