"""GBNF grammars that force a tool call in a model's own syntax (tool_choice required / named).

Each call is written exactly as the model's chat template renders calls in history, with the
arguments constrained by the tool's JSON schema through llama.cpp's own schema converter
(llama_cpp.llama_grammar.SchemaConverter, one converter so shared rules are written once).
Text before the call is not allowed; a thinking block is, for models that think.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from typing import Any

from worker.task import Tool, ToolChoice
from worker.toolformat import MistralCalls, Syntax, ToolFormat, deepseek_token

_DS_CALLS_BEGIN, _DS_CALLS_END = deepseek_token("tool calls begin"), deepseek_token("tool calls end")
_DS_CALL = (deepseek_token("tool call begin") + "function" + deepseek_token("tool sep"),
            deepseek_token("tool call end"))

# Names that every syntax can carry as they are (Mistral's and harmony's end at '[', '<' or a space).
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


def _lit(s: str) -> str:
    """A GBNF string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
        "\r", "\\r").replace("\t", "\\t") + '"'


def _class_char(c: str) -> str:
    return {"\\": "\\\\", "]": "\\]", "-": "\\-", "^": "\\^", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, c)


def _excluding(name: str, text: str) -> dict[str, str]:
    """Rules for any string that does not contain `text` (start rule: name + "-0").

    One rule per state of the Knuth-Morris-Pratt automaton of `text`: the state is how much of
    `text` the string ends with, and the transition that would complete it is left out. Exact
    for texts with no border (a proper prefix that is also a suffix), such as closing markers."""
    n = len(text)
    border = [0] * n
    k = 0
    for i in range(1, n):
        while k and text[i] != text[k]:
            k = border[k - 1]
        if text[i] == text[k]:
            k += 1
        border[i] = k

    def after(state: int, c: str) -> int:
        while state and text[state] != c:
            state = border[state - 1]
        return state + 1 if text[state] == c else 0

    chars = sorted(set(text))
    other = "[^" + "".join(_class_char(c) for c in chars) + "]"
    rules = {}
    for state in range(n):
        alts = [f"{_lit(c)} {name}-{nxt}" for c in chars if (nxt := after(state, c)) < n]
        alts.append(f"{other} {name}-0")
        rules[f"{name}-{state}"] = "( " + " | ".join(alts) + " )?"
    return rules


def _own_refs(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of `schema` whose local $refs point to "#/$defs/<prefix><n>", and those targets.

    The converter rewrites refs in place (so it gets a copy) and names a ref's rule after the
    ref's last segment, so two tools' "#/$defs/item" would otherwise share one rule."""
    schema = copy.deepcopy(schema)
    names: dict[str, str] = {}
    targets: dict[str, Any] = {}

    def target(ref: str) -> Any:
        node: Any = schema
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                if ref not in names:
                    names[ref] = f"{prefix}{len(names)}"
                    targets[names[ref]] = target(ref)
                node["$ref"] = "#/$defs/" + names[ref]
            for value in list(node.values()):
                walk(value)

    walk(schema)
    return schema, targets


class _Builder:
    def __init__(self) -> None:
        # Imported here: llama-cpp-python is the llama extra, and MLX-only installs parse calls too.
        from llama_cpp import llama_grammar

        converter: Any = llama_grammar.SchemaConverter  # untyped
        self.conv = converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.rules: dict[str, str] = {}

    def schema(self, name: str, schema: dict[str, Any], tool: str, defs: dict[str, Any] | None = None) -> str:
        """The rule for a JSON value matching `schema`: a tool's parameters, or one of them with
        the `defs` that `_own_refs` gave the whole."""
        try:
            if defs is None:
                schema, defs = _own_refs(schema, name + "-ref")
            if defs:
                schema = {**schema, "$defs": defs}
            schema = self.conv.resolve_refs(schema, "")
            rule: str = self.conv.visit(schema, name)
        except Exception as exc:  # the converter asserts and raises freely on schemas it cannot do
            raise ValueError(f"the parameters schema of tool {tool!r} cannot be turned into a grammar: "
                             f"{exc!r}") from exc
        return rule

    def text_until(self, name: str, close: str) -> str:
        self.rules.update(_excluding(name, close))
        return name + "-0"

    def grammar(self, root: str) -> str:
        own = "\n".join(f"{k} ::= {v}" for k, v in self.rules.items())
        return f"root ::= {root}\n{own}\n{self.conv.format_grammar()}\n"


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.parameters or {"type": "object"}


def tool_grammar(fmt: ToolFormat, tools: Sequence[Tool], choice: ToolChoice, parallel: bool,
                 *, thinking_started: bool = False) -> str:
    """GBNF forcing one call (several when `parallel` and the template can render them) of any
    of `tools` (choice "required") or of the named one, in `fmt`'s syntax. `thinking_started`:
    the prompt opened a thinking block, which the output must close first.

    Raises ValueError for what cannot be forced: a choice other than required/named, no tools,
    a named tool that is not among them, a name the syntax cannot carry, an unusable schema."""
    if choice.mode not in ("required", "named"):
        raise ValueError(f"tool_choice {choice.mode!r} does not force a call: only 'required' and a named "
                         "function are enforced by a grammar")
    if not tools:
        raise ValueError(f"tool_choice {choice.mode!r} needs at least one tool in `tools`")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError("tool names must be unique: " + ", ".join(twice))
    if choice.mode == "named":
        if not choice.name:
            raise ValueError("a named tool_choice needs the function's name")
        if choice.name not in names:
            raise ValueError(f"tool_choice names function {choice.name!r}, which is not in `tools` "
                             f"({', '.join(names)})")
        tools = [t for t in tools if t.name == choice.name]
    tagged = fmt.syntax in (Syntax.MISTRAL, Syntax.QWEN_XML, Syntax.GPT_OSS, Syntax.DEEPSEEK_R1)
    for t in tools:
        if not t.name or (tagged and not _SAFE_NAME.fullmatch(t.name)):
            raise ValueError(f"tool name {t.name!r} cannot be written in the {fmt.syntax.value} call syntax "
                             "(use letters, digits, '_', '.', ':' or '-')")
    b = _Builder()
    many = parallel and fmt.parallel
    if fmt.syntax is Syntax.GENERIC:
        body = _generic(b, tools, many)
    elif fmt.syntax is Syntax.GPT_OSS:
        return b.grammar(_gpt_oss(b, tools))
    else:
        calls = [_call(b, fmt, i, t) for i, t in enumerate(tools)]
        b.rules["tc-call"] = " | ".join(calls)
        body = _repeat(fmt, "tc-call") if many else _single(fmt, "tc-call")
    if fmt.think is not None and (fmt.thinks or thinking_started):
        opener, close = fmt.think
        b.rules["tc-think"] = ("" if thinking_started else _lit(opener) + " ") + \
            f"{b.text_until('tc-thought', close)} {_lit(close)} [ \\n]*"
        body = ("tc-think " if thinking_started else "tc-think? ") + body
    return b.grammar(body)


def _call(b: _Builder, fmt: ToolFormat, i: int, tool: Tool) -> str:
    """The rule of one call of `tool`, as its template writes calls."""
    name = json.dumps(tool.name, ensure_ascii=False)
    syntax = fmt.syntax
    if syntax is Syntax.QWEN_XML:
        return _xml_call(b, i, tool)
    args = b.schema(f"tc-{i}-args", _parameters(tool), tool.name)
    if syntax is Syntax.HERMES:
        return (_lit('<tool_call>\n{"name": ' + name + ', "arguments": ') + f" {args} "
                + _lit("}\n</tool_call>"))
    if syntax is Syntax.LLAMA3:
        return _lit('{"name": ' + name + ', "parameters": ') + f" {args} " + _lit("}")
    if syntax is Syntax.DEEPSEEK_R1:
        return (_lit(f"{_DS_CALL[0]}{tool.name}\n```json\n") + f" {args} " + _lit("```" + _DS_CALL[1]))
    # Mistral
    if fmt.mistral is MistralCalls.ARRAY:
        return (_lit('{"name": ' + name + ', "arguments": ') + f" {args} " + _lit(', "id": "')
                + ' [a-zA-Z0-9]{9} ' + _lit('"}'))
    call_id = ' "[CALL_ID]" [a-zA-Z0-9]{9} ' if fmt.mistral is MistralCalls.NAMED_ID else " "
    return _lit(f"[TOOL_CALLS]{tool.name}") + call_id + _lit("[ARGS]") + f" {args}"


def _single(fmt: ToolFormat, call: str) -> str:
    if fmt.syntax is Syntax.MISTRAL and fmt.mistral is MistralCalls.ARRAY:
        return f'"[TOOL_CALLS][" {call} "]"'
    if fmt.syntax is Syntax.DEEPSEEK_R1:
        return f"{_lit(_DS_CALLS_BEGIN)} {call} {_lit(_DS_CALLS_END)}"
    return call


def _repeat(fmt: ToolFormat, call: str) -> str:
    if fmt.syntax is Syntax.MISTRAL and fmt.mistral is MistralCalls.ARRAY:
        return f'"[TOOL_CALLS][" {call} ( ", " {call} )* "]"'
    if fmt.syntax is Syntax.DEEPSEEK_R1:
        return f'{_lit(_DS_CALLS_BEGIN)} {call} ( "\\n" {call} )* {_lit(_DS_CALLS_END)}'
    if fmt.syntax is Syntax.MISTRAL:
        return f"{call}+"
    return f'{call} ( "\\n" {call} )*'


def _xml_call(b: _Builder, i: int, tool: Tool) -> str:
    """<tool_call>\\n<function=f>\\n(<parameter=p>\\nvalue\\n</parameter>\\n)*</function>\\n</tool_call>:
    string parameters are free text, others JSON of their schema; declared order."""
    params, defs = _own_refs(_parameters(tool), f"tc-{i}-ref")
    props = params.get("properties") or {}
    required = set(params.get("required") or ())
    parts = []
    for j, (pname, pschema) in enumerate(props.items()):
        if not _SAFE_NAME.fullmatch(pname):
            raise ValueError(f"parameter {pname!r} of tool {tool.name!r} cannot be written as "
                             "<parameter=...>")
        pschema = pschema if isinstance(pschema, dict) else {}
        if pschema.get("type") == "string" or not pschema:
            value = b.text_until("tc-xml-text", "\n</parameter>")
        else:
            value = b.schema(f"tc-{i}-p{j}", pschema, tool.name, defs)
        part = f"{_lit(f'<parameter={pname}>' + chr(10))} {value} {_lit(chr(10) + '</parameter>' + chr(10))}"
        parts.append(part if pname in required else f"( {part} )?")
    body = " ".join(parts)
    return (_lit(f"<tool_call>\n<function={tool.name}>\n") + f" {body} " + _lit("</function>\n</tool_call>"))


def _generic(b: _Builder, tools: Sequence[Tool], many: bool) -> str:
    """llama.cpp's generic handler: the whole reply is {"tool_call": ...} or {"tool_calls": [...]}."""
    calls, defs = [], {}
    for i, t in enumerate(tools):  # each tool's $refs, renamed apart, point to the top-level $defs
        params, own = _own_refs(_parameters(t), f"tc-{i}-ref")
        defs.update(own)
        calls.append({"type": "object", "properties": {"name": {"const": t.name}, "arguments": params},
                      "required": ["name", "arguments"]})
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = (
        {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
         "required": ["tool_calls"]} if many
        else {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]})
    if defs:
        schema["$defs"] = defs
    return b.schema("tc-generic", schema, " / ".join(t.name for t in tools))


def _gpt_oss(b: _Builder, tools: Sequence[Tool]) -> str:
    """harmony: an optional analysis message, then one message to functions.<name> (the template
    renders one call per message and <|call|> ends the generation)."""
    calls = []
    for i, t in enumerate(tools):
        args = b.schema(f"tc-{i}-args", _parameters(t), t.name)
        calls.append(_lit(f" to=functions.{t.name}<|channel|>commentary json<|message|>") + f" {args}")
    b.rules["tc-call"] = " | ".join(calls)
    thought = b.text_until("tc-thought", "<|end|>")
    b.rules["tc-analysis"] = f'"<|channel|>analysis<|message|>" {thought} "<|end|><|start|>assistant"'
    return "tc-analysis? tc-call"
