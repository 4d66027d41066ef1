"""Split a choice's streamed text into visible text, reasoning and tool calls.

`ChoiceParser` is fed the generated text piece by piece and returns `worker.outputs` deltas
as soon as they are decided. Text that may be the start of a tool call or of a thinking
marker is held back until the next pieces decide it, so markers never reach the client.
A tool call is announced (`ToolCallBegin`) once its function is known to be one of the
request's tools; its arguments then stream as `ToolCallArgs`, raw model JSON checked
character by character, so the pieces of one call always join into one JSON object:
if the model stops or breaks the JSON mid-way, the shortest completion is sent and the rest
of the text becomes visible text. Before a call is announced nothing is committed: output
that turns out not to be a call is given back as text, so no text is ever dropped.

The syntaxes follow llama.cpp's chat parsers (common/chat.cpp); `detect_format` picks one
from the chat template and `tool_grammar` builds the GBNF that forces it.
"""

from __future__ import annotations

import re
import secrets
import string
from collections.abc import Callable, Sequence

from worker.jsoncalls import CALL_KEYS, CallList, MistralCall, NamedArgs, PyCall, Wrapper, call_follows
from worker.jsonscan import WS
from worker.outputs import Delta
from worker.tagcalls import DeepSeekCalls, Harmony, XmlCall
from worker.task import Tool, ToolChoice
from worker.toolformat import (
    DEEPSEEK_CALLS_BEGIN,
    MistralCalls,
    Syntax,
    ToolFormat,
    detect_format,
    template_tools,
    tools_system_prompt,
)
from worker.toolscan import (
    FAIL,
    NEED,
    Frame,
    Miss,
    ToolScan,
    Until,
    first_key,
    match_any,
    match_at,
    skip_ws,
)

__all__ = [
    "ChoiceParser", "MistralCalls", "Syntax", "ToolFormat", "detect_format", "mistral_call_id",
    "openai_call_id", "template_tools", "tools_system_prompt",
]

_ALNUM = string.ascii_letters + string.digits
# Tags legacy llama.cpp saw Hermes-style models wrap a call object in.
_HERMES_TAGS = ("<tool_call>", "<function_call>", "<tools>", "<tool>", "<response>", "<json>", "<xml>",
                "<JSON>")
_FENCES = ("```json\n", "```xml\n", "```\n")
_NAME = re.compile(r'[^>"\s]*')
_PY_CALL = re.compile(r"([A-Za-z_]\w*)\.call\(")
_PY_CALL_PREFIX = re.compile(r"[A-Za-z_]\w*(?:\.(?:c(?:a(?:l(?:l\(?)?)?)?)?)?")


def openai_call_id() -> str:
    """An id like OpenAI's: call_ and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def mistral_call_id() -> str:
    """The 9 alphanumerics Mistral's templates insist on when the id comes back in history."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


class ChoiceParser:
    """Turns one choice's streamed text into Text / Reasoning / ToolCallBegin / ToolCallArgs.

    `tools`: the request's tools; only calls to these are parsed (to `choice.name` alone when
    the choice is "named"; none when it is "none"). `reasoning_format` "none" leaves thinking
    in the text. `thinking_started`: the prompt ended with the opening think marker, so the
    output starts inside thinking (with "none" that marker and a newline are put back first,
    as such templates write "<think>\\n"). `new_id` makes call ids (tests pass their own).
    """

    def __init__(self, fmt: ToolFormat, tools: Sequence[Tool], reasoning_format: str = "auto",
                 thinking_started: bool = False, *, choice: ToolChoice | None = None,
                 new_id: Callable[[], str] | None = None) -> None:
        choice = choice or ToolChoice()
        wanted = {t.name: t for t in tools if choice.mode != "named" or t.name == choice.name}
        self._scan = ToolScan(fmt, {} if choice.mode == "none" else wanted, reasoning_format != "none",
                              new_id or (mistral_call_id if fmt.syntax is Syntax.MISTRAL else openai_call_id))
        scan = self._scan
        scan.stack.append(Harmony() if fmt.syntax is Syntax.GPT_OSS else _TextFrame(fmt))
        if thinking_started and fmt.think:
            scan.started = True
            if not scan.reason:
                scan.text_raw(fmt.think[0] + "\n")
            scan.stack.append(thinking_frame(scan))

    @property
    def calls(self) -> int:
        """Tool calls begun so far."""
        return self._scan.calls

    def feed(self, text: str) -> list[Delta]:
        self._scan.buf += text
        self._scan.run()
        return self._scan.flush()

    def end(self) -> list[Delta]:
        """The generation ended: decide everything still held back."""
        self._scan.final = True
        self._scan.run()
        self._scan.end_text()
        return self._scan.flush()


def thinking_frame(p: ToolScan) -> Until:
    """The frame for a thinking block (its opening marker already read)."""
    assert p.fmt.think is not None
    return Until((p.fmt.think[1],), reasoning=True, keep_close=not p.reason)


Opened = tuple[int, Frame] | Miss  # (characters the opener takes, the frame that goes on)


class _TextFrame(Frame):
    """Visible text, watching for whatever may open a tool call or (at the start) thinking."""

    _FIRST = {Syntax.HERMES: "<`{", Syntax.QWEN_XML: "<", Syntax.LLAMA3: "{<", Syntax.MISTRAL: "[",
              Syntax.DEEPSEEK_R1: "<", Syntax.GENERIC: "{", Syntax.GPT_OSS: ""}

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._opener: Callable[[ToolScan, str, int], Opened] = _OPENERS.get(fmt.syntax, _open_none)
        first = self._FIRST[fmt.syntax]
        think = fmt.think[0][0] if fmt.think else ""
        self._patterns = {(calls, start): _charset(first * calls + think * start)
                          for calls in (False, True) for start in (False, True)}

    def step(self, p: ToolScan) -> bool:
        buf = p.buf
        if not buf:
            return False
        think = self.fmt.think if not p.started else None
        pattern = self._patterns[(bool(p.tools), think is not None)]
        i = 0
        while True:
            m = pattern.search(buf, i) if pattern else None
            if m is None:
                p.text(p.take(len(buf)))
                return True
            j = m.start()
            # thinking opens only before any text
            res = self._open(p, buf, j, think if not buf[:j].strip(WS) else None)
            if res is FAIL:
                i = j + 1
                continue
            if j:
                p.text(p.take(j))
            if res is NEED:
                if not p.final:
                    return j > 0
                p.text(p.take(1))
                return True
            assert not isinstance(res, Miss)
            n, frame = res
            if isinstance(frame, Until):  # thinking opens: it is reasoning even if never closed
                p.ws = ""  # whitespace before it is not text
                p.started = True
                marker = p.take(n)
                if not p.reason:
                    p.text_raw(marker)
            else:
                p.mark(1)
                p.take(n)
            p.stack.append(frame)
            return True

    def _open(self, p: ToolScan, buf: str, j: int, think: tuple[str, str] | None) -> Opened:
        if think is not None and buf[j] == think[0][0]:
            r = match_at(buf, j, think[0])
            if r:
                return len(think[0]), thinking_frame(p)
            if r is None:
                return NEED
        return self._opener(p, buf, j) if p.tools else FAIL


def _charset(chars: str) -> re.Pattern[str] | None:
    chars = "".join(sorted(set(chars)))
    return re.compile("[" + re.escape(chars) + "]") if chars else None


def _open_none(p: ToolScan, buf: str, j: int) -> Opened:
    return FAIL


def _open_bare(buf: str, j: int) -> Opened:
    """A call written as a bare JSON object: its first key must be "name" (or Llama's "type")."""
    miss = call_follows(buf, j, ("name", "type"))
    return miss or (0, CallList("", single=True))


def _open_wrapped(buf: str, j: int, n: int, frame: Frame) -> Opened:
    """An opener of n characters at j that must be followed by a call object (or an array)."""
    miss = call_follows(buf, skip_ws(buf, j + n), CALL_KEYS, array=True)
    return miss or (n, frame)


def _open_hermes(p: ToolScan, buf: str, j: int) -> Opened:
    c = buf[j]
    if c == "{":
        return _open_bare(buf, j)
    if c == "`":  # legacy llama.cpp also took calls fenced as ```json / ```xml, maybe inside a tag
        fence = match_any(buf, j, _FENCES)
        if isinstance(fence, Miss):
            return fence
        k = skip_ws(buf, j + len(fence))
        if k == len(buf):
            return NEED
        tag = ""
        if buf[k] == "<":
            t = match_any(buf, k, _HERMES_TAGS)
            if isinstance(t, Miss):
                return t
            tag, k = t, k + len(t)
        close = "</" + tag[1:] if tag else ""
        return _open_wrapped(buf, j, k - j, CallList(close, then="```"))
    t = match_any(buf, j, (*_HERMES_TAGS, "<function=", '<function name="'))
    if isinstance(t, Miss):
        return t
    if t.startswith("<function"):  # <function=name>{args}</function>, as legacy llama.cpp took
        m = _NAME.match(buf, j + len(t))
        assert m is not None
        end = ">" if t == "<function=" else '">'
        r = match_at(buf, m.end(), end)
        if not r:
            return NEED if r is None else FAIL
        return m.end() + len(end) - j, NamedArgs(m.group(), "</function>")
    return _open_wrapped(buf, j, len(t), CallList("</" + t[1:]))


def _open_xml(p: ToolScan, buf: str, j: int) -> Opened:
    t = match_any(buf, j, ("<tool_call>", "<function="))
    if isinstance(t, Miss):
        return t
    if t == "<function=":  # Qwen3-Coder sometimes leaves out <tool_call>
        return 0, XmlCall()
    k = skip_ws(buf, j + len(t))
    if k == len(buf):
        return NEED
    if buf[k] == "{":  # a Hermes-style JSON call inside the same tags
        return _open_wrapped(buf, j, len(t), CallList("</tool_call>"))
    r = match_at(buf, k, "<function=")
    if not r:
        return NEED if r is None else FAIL
    return k - j, XmlCall()


def _open_llama(p: ToolScan, buf: str, j: int) -> Opened:
    if buf[j] == "{":
        return _open_bare(buf, j)
    tag = "<|python_tag|>"
    r = match_at(buf, j, tag)
    if not r:
        return NEED if r is None else FAIL
    k = skip_ws(buf, j + len(tag))
    if k == len(buf):
        return NEED
    if buf[k] == "{":
        return _open_wrapped(buf, j, len(tag), CallList("", single=True))
    if not p.fmt.python_tag_calls:
        return FAIL
    m = _PY_CALL.match(buf, k)
    if m:
        return m.end() - j, PyCall(m.group(1))
    prefix = _PY_CALL_PREFIX.match(buf, k)
    return NEED if prefix and prefix.end() == len(buf) else FAIL


def _open_mistral(p: ToolScan, buf: str, j: int) -> Opened:
    tag = "[TOOL_CALLS]"
    r = match_at(buf, j, tag)
    if not r:
        return NEED if r is None else FAIL
    k = skip_ws(buf, j + len(tag))
    if k == len(buf):
        return NEED
    if buf[k] == "[":  # Nemo: a JSON array of {"name", "arguments", "id"}
        return k + 1 - j, CallList("]", adjacent=False, array=True)
    return len(tag), MistralCall()


def _open_generic(p: ToolScan, buf: str, j: int) -> Opened:
    key = first_key(buf, j)
    if isinstance(key, Miss):
        return key
    if key in ("tool_call", "tool_calls", "response"):
        return 0, Wrapper()
    return _open_bare(buf, j)


def _open_deepseek(p: ToolScan, buf: str, j: int) -> Opened:
    t = match_any(buf, j, DEEPSEEK_CALLS_BEGIN)
    return t if isinstance(t, Miss) else (len(t), DeepSeekCalls())


_OPENERS: dict[Syntax, Callable[[ToolScan, str, int], Opened]] = {
    Syntax.HERMES: _open_hermes, Syntax.QWEN_XML: _open_xml, Syntax.LLAMA3: _open_llama,
    Syntax.MISTRAL: _open_mistral, Syntax.GENERIC: _open_generic, Syntax.DEEPSEEK_R1: _open_deepseek,
}
