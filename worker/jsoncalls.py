"""Frames for calls written as JSON: objects with a name and arguments (Hermes, Llama 3,
Mistral Nemo, llama.cpp's generic reply), and arguments objects after a marker (Mistral's
[ARGS], <function=name>, Llama's builtin name.call(...)). Arguments are sent on as the
model's own JSON text while they stream."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from worker.jsonscan import JsonScanner
from worker.toolscan import (
    FAIL,
    NAME_MAX,
    NEED,
    Frame,
    Miss,
    ObjectFrame,
    ToolScan,
    first_key,
    match_any,
    match_at,
    skip_ws,
    string_at,
)

CALL_KEYS = ("name", "arguments", "parameters", "id", "type")
_ARGS_KEYS = ("arguments", "parameters")
_MISTRAL_NAME = re.compile(r"\s*([^\[\]\s]*)")
_PY_ARG = re.compile(r"([A-Za-z_]\w*)\s*(=)?\s*")


def call_follows(buf: str, i: int, keys: Sequence[str], array: bool = False) -> Miss | None:
    """None if a call object whose first key is one of `keys` (or, with `array`, an array of
    them) starts at buf[i]; else NEED or FAIL."""
    if i == len(buf):
        return NEED
    if buf[i] == "[" and array:
        j = skip_ws(buf, i + 1)
        return NEED if j == len(buf) else call_follows(buf, j, keys)
    if buf[i] != "{":
        return FAIL
    key = first_key(buf, i)
    return key if isinstance(key, Miss) else None if key in keys else FAIL


def _decodable(raw: str, start: int, end: int) -> int:
    """How far raw[start:end] (JSON string body) can be decoded now: not into an unfinished
    escape, nor past a high surrogate whose pair may follow."""
    k = raw.rfind("\\", start, end)
    if k < 0:
        return end
    j = k
    while j > start and raw[j - 1] == "\\":
        j -= 1
    if (k - j) % 2:  # the last backslash is itself escaped
        return end
    tail = raw[k:end]
    if len(tail) == 1 or (tail[1] == "u" and len(tail) < 6):
        return k
    if tail[1] == "u" and len(tail) == 6 and tail[2] in "dD" and tail[3] in "89abAB":
        return k
    return end


class CallList(Frame):
    """Call objects up to a closing marker: <tool_call>…</tool_call>, Nemo's […], a fenced
    block, or (`single`) one bare object. `adjacent`: objects may follow without a comma."""

    def __init__(self, close: str, then: str = "", adjacent: bool = True, array: bool = False,
                 single: bool = False) -> None:
        self.close, self.then, self.adjacent, self.array, self.single = close, then, adjacent, array, single
        self.phase = 0  # 0: a call must come; 1: one just ended; 2: between calls; 3: after ','; 4: closed

    def step(self, p: ToolScan) -> bool:
        if self.phase == 1:
            if self.single:
                p.strip_lead = True
                return p.pop()
            p.mark(0)  # what follows a finished call is given back as text if it is not structure
            self.phase = 2
            return True
        buf = p.skip_ws()
        if not buf:
            return p.need()
        c = buf[0]
        if self.phase in (0, 3) or (self.phase == 2 and c == "{" and self.adjacent):
            if c == "{":
                self.phase = 1
                return p.push(CallObject())
            if c == "[" and self.phase == 0 and not self.array:
                p.take(1)
                self.phase = 1
                return p.push(CallList("]", adjacent=False, array=True))
            return p.fail()
        if self.phase == 2:
            if c == "," and (self.array or self.adjacent):
                p.take(1)
                self.phase = 3
                return True
            r = match_at(buf, 0, self.close) if self.close else True
            if r is None:
                return p.need()
            if not r:
                return p.fail()
            p.take(len(self.close))
            if not self.then:
                return self._done(p)
            self.phase = 4
            return True
        r = match_at(buf, 0, self.then)
        if r is None:
            return p.need()
        if not r:
            return p.fail()
        p.take(len(self.then))
        return self._done(p)

    def _done(self, p: ToolScan) -> bool:
        p.commit()
        p.strip_lead = True
        return p.pop()


class CallObject(ObjectFrame):
    """One call as a JSON object: {"name": f, "arguments": {...}} and the variants (Llama's
    "parameters", a leading "type", Nemo's "id"). The call is announced when the name is read;
    arguments read before it are kept and sent with the announcement."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.id: str | None = None
        self.index = -1  # once announced
        self.args: str | None = None  # arguments read before the name
        self.sent_args = False
        self.child: Frame | None = None

    def _key_ok(self, key: str) -> bool:
        return key in CALL_KEYS or self.index >= 0

    def _child_done(self) -> None:
        if isinstance(self.child, Args):
            if self.index >= 0:
                self.sent_args = True
            else:
                self.args = self.child.text

    def _end(self, p: ToolScan) -> bool:
        p.take(1)
        return self._close(p)

    def _value(self, p: ToolScan, buf: str, c: str) -> bool:
        key = self.key
        if key in ("name", "id", "type") and c == '"':
            r = string_at(buf, 0)
            if isinstance(r, Miss):
                return p.need() if r is NEED else p.fail()
            value, end = r
            if key == "name" and self.name is None:
                if not p.allowed(value):
                    return p.fail()
                self.name = value
                p.take(end)
                self.index = p.begin(value, self.id)
                if self.args is not None:
                    p.args(self.index, self.args)
                    p.closer, self.sent_args = None, True
            else:
                if key == "id" and self.index < 0:
                    self.id = value
                p.take(end)
            self.phase = "after"
            return True
        if key in _ARGS_KEYS and self.args is None and not self.sent_args:
            if c == "{":
                self.child = Args(self.index if self.index >= 0 else None)
                self.phase = "child"
                return p.push(self.child)
            if c == '"':  # arguments as a JSON string holding the object, as some models write them
                r = string_at(buf, 0, limit=None)
                if isinstance(r, Miss):
                    return p.need() if r is NEED else p.fail()
                text = r[0]
                try:
                    ok = isinstance(json.loads(text), dict)
                except ValueError:
                    ok = False
                if not ok:
                    return p.fail()
                p.take(r[1])
                self._got_args(p, text)
                self.phase = "after"
                return True
        if self.index < 0:
            return p.fail()
        self.child = Skip()
        self.phase = "child"
        return p.push(self.child)

    def _got_args(self, p: ToolScan, text: str) -> None:
        if self.index < 0:
            self.args = text
        else:
            p.args(self.index, text)
            p.closer, self.sent_args = None, True

    def _close(self, p: ToolScan) -> bool:
        if self.index < 0:
            return p.fail()
        if not self.sent_args:
            p.args(self.index, "{}")
        p.closer = None
        return p.pop()


class Args(Frame):
    """A JSON value sent on as a call's arguments while it streams (or kept, for a call not yet
    announced: `index` None). `rest` is what completes the call's arguments after this value."""

    def __init__(self, index: int | None, rest: str = "", require_object: bool = True) -> None:
        self.scan = JsonScanner()
        self.index, self.rest, self.require_object = index, rest, require_object
        self.text = ""
        self.sent = 0

    def step(self, p: ToolScan) -> bool:
        if not self.scan.consumed:
            p.skip_ws()
            if not p.buf:
                return p.need()
            if self.require_object and p.buf[0] != "{":
                return p.fail()
            if self.index is not None:
                p.closer = self._closing
        buf = p.buf
        if not buf:  # (at the end, failing closes the arguments just as finishing them would)
            return p.need()
        piece = p.take(self.scan.feed(buf))
        self.text += piece
        if self.index is not None and self.scan.safe > self.sent:
            p.args(self.index, self.text[self.sent:self.scan.safe])
            self.sent = self.scan.safe
        if self.scan.done:
            return self._done(p)
        if self.scan.error:
            return p.fail()
        return True

    def _closing(self) -> str:
        return self.scan.closing() + self.rest

    def _done(self, p: ToolScan) -> bool:
        if self.index is not None:
            rest = self.rest
            p.closer = (lambda: rest) if rest else None
        return p.pop()


class Skip(Frame):
    """A JSON value read past (keys of an announced call that mean nothing here)."""

    def __init__(self) -> None:
        self.scan = JsonScanner()

    def step(self, p: ToolScan) -> bool:
        if not p.buf:
            return p.need()
        p.take(self.scan.feed(p.buf))
        if self.scan.done:
            return p.pop()
        return p.fail() if self.scan.error else True


class NamedArgs(Frame):
    """<function=name>{args}</function> (and <function name="name">), as legacy llama.cpp took."""

    def __init__(self, name: str, close: str) -> None:
        self.name, self.close = name, close
        self.phase = 0

    def step(self, p: ToolScan) -> bool:
        if self.phase == 0:
            if not p.allowed(self.name):
                return p.fail()
            self.phase = 1
            return p.push(Args(p.begin(self.name, None)))
        if self.phase == 1:
            p.mark(0)
            self.phase = 2
            return True
        p.skip_ws()
        r = match_at(p.buf, 0, self.close)
        if not r:
            return p.need() if r is None else p.fail()
        p.take(len(self.close))
        p.commit()
        p.strip_lead = True
        return p.pop()


class MistralCall(Frame):
    """name[CALL_ID]id[ARGS]{...} after [TOOL_CALLS] (Mistral Small 3.2, Devstral, Ministral)."""

    def __init__(self) -> None:
        self.phase = 0

    def step(self, p: ToolScan) -> bool:
        if self.phase:
            p.strip_lead = True
            return p.pop()
        buf = p.buf
        m = _MISTRAL_NAME.match(buf)
        assert m is not None
        name, k = m.group(1), m.end()
        if k == len(buf):
            return p.need() if k <= NAME_MAX else p.fail()
        marker = match_any(buf, k, ("[CALL_ID]", "[ARGS]"))
        if isinstance(marker, Miss) or not name:
            return p.need() if marker is NEED and name else p.fail()
        call_id = None
        k += len(marker)
        if marker == "[CALL_ID]":
            m = _MISTRAL_NAME.match(buf, k)
            assert m is not None
            call_id, k = m.group(1), m.end()
            r = match_at(buf, k, "[ARGS]")
            if not r:
                return p.need() if r is None else p.fail()
            k += len("[ARGS]")
        if not p.allowed(name):
            return p.fail()
        p.take(k)
        self.phase = 1
        return p.push(Args(p.begin(name, call_id)))


class PyCall(Frame):
    """Llama 3.1's builtin tools: <|python_tag|>name.call(arg=<JSON value>, ...)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.phase = 0  # 0: announce; 1: an argument or ')'; 2: after a value
        self.index = -1
        self.count = 0

    def step(self, p: ToolScan) -> bool:
        if self.phase == 0:
            if not p.allowed(self.name):
                return p.fail()
            self.index = p.begin(self.name, None)
            p.args(self.index, "{")
            p.closer = close_brace
            self.phase = 1
            return True
        buf = p.skip_ws()
        if not buf:
            return p.need()
        if buf[0] == ")":
            p.take(1)
            p.args(self.index, "}")
            p.closer = None
            p.strip_lead = True
            return p.pop()
        if self.phase == 2:
            if buf[0] != ",":
                return p.fail()
            p.take(1)
            self.phase = 1
            return True
        m = _PY_ARG.match(buf)
        if m is None:
            return p.fail()
        if m.end() == len(buf):
            return p.need()
        if not m.group(2):
            return p.fail()
        p.take(m.end())
        p.args(self.index, ("," if self.count else "") + json.dumps(m.group(1)) + ":")
        self.count += 1
        p.closer = null_close
        self.phase = 2
        return p.push(Args(self.index, rest="}", require_object=False))


def close_brace() -> str:
    return "}"


def null_close() -> str:
    return "null}"


class Wrapper(ObjectFrame):
    """llama.cpp's generic JSON reply: {"tool_call": {...}}, {"tool_calls": [...]} (maybe with
    "content") or {"response": "..."}, whose text is sent as visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.answered = False  # a call or a reply was read

    def _child_done(self) -> None:
        self.answered = True

    def _end(self, p: ToolScan) -> bool:
        if not self.answered:
            return p.fail()
        p.take(1)
        p.commit()
        p.strip_lead = True
        return p.pop()

    def _value(self, p: ToolScan, buf: str, c: str) -> bool:
        self.phase = "child"
        if self.key == "tool_call" and c == "{":
            return p.push(CallObject())
        if self.key == "tool_calls" and c == "[":
            p.take(1)
            return p.push(CallList("]", adjacent=False, array=True))
        if self.key in ("response", "content") and c == '"':
            p.commit()
            return p.push(JsonText())
        if p.tentative:
            return p.fail()
        return p.push(Skip())


class JsonText(Frame):
    """A JSON string sent, decoded, as visible text while it streams."""

    def __init__(self) -> None:
        self.scan = JsonScanner()
        self.raw = ""
        self.sent = 1  # past the opening quote

    def step(self, p: ToolScan) -> bool:
        if not p.buf:
            return p.need()
        self.raw += p.take(self.scan.feed(p.buf))
        if self.scan.error:
            return p.fail()
        end = len(self.raw) - 1 if self.scan.done else len(self.raw)
        cut = end if self.scan.done else _decodable(self.raw, self.sent, end)
        if cut > self.sent:
            p.text_raw(json.loads('"' + self.raw[self.sent:cut] + '"'))
            self.sent = cut
        return p.pop() if self.scan.done else True
