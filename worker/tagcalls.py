"""Frames for calls in tagged syntaxes: Qwen3-Coder's XML parameters, DeepSeek R1's special
tokens, and gpt-oss's harmony messages (which also carry its reasoning and text)."""

from __future__ import annotations

import json
import re

from worker.jsoncalls import Args, close_brace, null_close
from worker.task import Tool
from worker.toolformat import deepseek_token
from worker.toolscan import (
    FAIL,
    NAME_MAX,
    NEED,
    Frame,
    ToolScan,
    Until,
    match_any,
    match_at,
    partial_tail,
    skip_ws,
)

_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_HARMONY_STARTS = ("<|start|>", "<|channel|>", " to=")
_PLAIN_ENDS = ("<|start|>", "<|channel|>", *_HARMONY_ENDS)
_HEADER_MAX = 512  # a header longer than this is not one (its text is sent, not held)


class DeepSeekCalls(Frame):
    """After DeepSeek R1's <tool calls begin>: [<tool call begin>]function<tool sep>name\\n```json\\n
    {args}```<tool call end>, repeated, then <tool calls end> (all special tokens)."""

    _HEAD = (deepseek_token("tool call begin"), "function", deepseek_token("tool sep"))
    _CALL_END = deepseek_token("tool call end")
    _END = deepseek_token("tool calls end")

    def __init__(self) -> None:
        self.phase = 0  # 0: a call or the end; 1: a call's args ended; 2: its closing markers

    def step(self, p: ToolScan) -> bool:
        if self.phase == 1:
            p.mark(0)
            self.phase = 2
            return True
        buf = p.skip_ws()
        if not buf:
            return p.need()
        if self.phase == 2:
            k = 0
            for lit in ("```", self._CALL_END):
                k = skip_ws(buf, k)
                r = match_at(buf, k, lit)
                if r is None:
                    return p.need()
                if r:
                    k += len(lit)
                elif lit != "```":
                    return p.fail()
            p.take(k)
            self.phase = 0
            return True
        r = match_at(buf, 0, self._END)
        if r is None:
            return p.need()
        if r:
            p.take(len(self._END))
            p.commit()
            p.strip_lead = True
            return p.pop()
        k = 0
        for lit in self._HEAD:
            r = match_at(buf, k, lit)
            if r is None:
                return p.need()
            if r:
                k += len(lit)
            elif lit == self._HEAD[2]:
                return p.fail()
        nl = buf.find("\n", k)
        if nl < 0:
            return p.need() if len(buf) - k <= NAME_MAX else p.fail()
        name = buf[k:nl].strip()
        k = nl + 1
        fence = match_any(buf, k, ("```json\n", "```\n"))
        if fence is NEED:
            return p.need()
        if isinstance(fence, str):
            k += len(fence)
        if not p.allowed(name):
            return p.fail()
        p.take(k)
        self.phase = 1
        return p.push(Args(p.begin(name, None)))


class XmlCall(Frame):
    """Qwen3-Coder / Qwen3.5: <function=name>\\n<parameter=p>\\nvalue\\n</parameter>\\n...</function>
    </tool_call>. Arguments are made into JSON: string parameters (per the tool's schema) as
    JSON strings streamed as they come, others parsed as JSON (else kept as a string)."""

    def __init__(self) -> None:
        self.phase = 0  # 0: <function=; 1: a parameter or </function>; 2: a value; 3: </tool_call>
        self.index = -1
        self.tool: Tool | None = None
        self.count = 0
        self.kind = "string"  # of the value being read: "string", "json" or "either"
        self.value = ""
        self.fresh = True  # the value's first character not seen yet (a newline there is markup)

    def step(self, p: ToolScan) -> bool:
        if self.phase == 2:
            return self._value(p)
        buf = p.skip_ws()
        if not buf:
            return p.need()
        if self.phase == 3:
            r = match_at(buf, 0, "</tool_call>")
            if r is None:
                return p.need()
            if r:
                p.take(len("</tool_call>"))
            p.commit()
            p.strip_lead = True
            return p.pop()
        if self.phase == 1:
            r = match_at(buf, 0, "</function>")
            if r is None:
                return p.need()
            if r:
                p.take(len("</function>"))
                p.args(self.index, "}")
                p.closer = None
                p.mark(0)
                self.phase = 3
                return True
        opener = "<function=" if self.phase == 0 else "<parameter="
        r = match_at(buf, 0, opener)
        if not r:
            return p.need() if r is None else p.fail()
        close = buf.find(">", len(opener))
        if close < 0:
            return p.need() if len(buf) - len(opener) <= NAME_MAX else p.fail()
        name = buf[len(opener):close]
        if self.phase == 0:
            if not p.allowed(name):
                return p.fail()
            p.take(close + 1)
            self.index = p.begin(name, None)
            self.tool = p.tools[name]
            p.args(self.index, "{")
            p.closer = close_brace
            self.phase = 1
            return True
        p.take(close + 1)
        p.args(self.index, ("," if self.count else "") + json.dumps(name, ensure_ascii=False) + ":")
        self.count += 1
        self.kind = self._kind(name)
        self.value, self.fresh, self.phase = "", True, 2
        if self.kind == "string":
            p.args(self.index, '"')
            p.closer = _close_string
        else:
            p.closer = null_close
        return True

    def _kind(self, param: str) -> str:
        assert self.tool is not None
        props = self.tool.parameters.get("properties")
        schema = props.get(param) if isinstance(props, dict) else None
        types = schema.get("type") if isinstance(schema, dict) else None
        if types == "string":
            return "string"
        if (isinstance(types, list) and "string" in types) or types is None:
            return "either"
        return "json"

    def _value(self, p: ToolScan) -> bool:
        buf = p.buf
        if self.fresh:
            if not buf:
                return p.need()
            if buf[0] == "\n":
                p.take(1)
                buf = p.buf
            self.fresh = False
        end = buf.find("\n</parameter>")
        bare = buf.find("</parameter>")
        if end < 0 or 0 <= bare < end:
            end, close = bare, len("</parameter>")
        else:
            close = len("\n</parameter>")
        if end < 0:
            if p.final:
                return p.fail()
            n = len(buf) - partial_tail(buf, ("\n</parameter>", "</parameter>"))
            if not n:
                return False
            self._piece(p, p.take(n))
            return True
        self._piece(p, p.take(end))
        p.take(close)
        if self.kind == "string":
            p.args(self.index, '"')
        else:
            text = self.value.strip()
            try:
                json.loads(text)
            except ValueError:
                text = json.dumps(self.value, ensure_ascii=False)
            p.args(self.index, text)
        p.closer = close_brace
        self.phase = 1
        return True

    def _piece(self, p: ToolScan, s: str) -> None:
        if self.kind == "string":
            p.args(self.index, json.dumps(s, ensure_ascii=False)[1:-1])
        else:
            self.value += s


def _close_string() -> str:
    return '"}'


class Harmony(Frame):
    """gpt-oss (harmony) output: messages of a header (<|channel|>analysis / final / commentary,
    maybe ` to=functions.name`) and a body ending at <|end|>, <|call|> or <|return|>. Analysis is
    reasoning, final and commentary are text, a body addressed to a tool is its arguments."""

    def __init__(self) -> None:
        # The prompt ends with "<|start|>assistant": only the first header may begin " to=".
        self.first = True

    def step(self, p: ToolScan) -> bool:
        buf = p.buf
        if not buf:
            return False
        end = match_any(buf, 0, _HARMONY_ENDS)
        start = match_any(buf, 0, _HARMONY_STARTS if self.first else _HARMONY_STARTS[:2])
        if isinstance(end, str):  # between messages
            self.first = False
            p.take(len(end))
            return True
        if start is FAIL and end is FAIL:
            self.first = False
            return self._plain(p, buf)
        i = buf.find("<|message|>", 0, _HEADER_MAX) if isinstance(start, str) else -1
        if i < 0:  # a header still coming, or a marker-like start that never becomes one
            if not p.final and len(buf) < _HEADER_MAX:
                return False
            self.first = False
            p.text(p.take(1))
            return True
        self.first = False
        header = p.take(i + len("<|message|>")).removeprefix("<|start|>assistant")
        channels = re.findall(r"<\|channel\|>(\w+)", header)
        channel = channels[-1] if channels else "final"
        to = [r for r in re.findall(r"to=([^\s<]+)", header) if r != "assistant"]
        tool = to[-1].removeprefix("functions.") if to and to[-1].startswith("functions.") else None
        if tool is not None and p.allowed(tool):
            return p.push(Args(p.begin(tool, None)))
        if channel == "analysis" and not to:
            if not p.reason:  # llama.cpp keeps the analysis message's markers in the text
                p.text_raw("<|channel|>analysis<|message|>")
            return p.push(Until(_HARMONY_ENDS, reasoning=True, keep_close=not p.reason))
        return p.push(Until(_HARMONY_ENDS, reasoning=False))

    def _plain(self, p: ToolScan, buf: str) -> bool:
        """Text outside any message header: up to the next header or end marker."""
        hits = [i for s in _PLAIN_ENDS if (i := buf.find(s)) > 0]
        n = min(hits) if hits else len(buf) - partial_tail(buf, _PLAIN_ENDS)
        if not n and p.final:
            n = len(buf)
        if n:
            p.text(p.take(n))
        return n > 0
