"""The state of reading one choice's output for tool calls, shared by the syntax frames.

A `ToolScan` holds the input not yet decided and the deltas decided so far. What is being
read is a stack of `Frame`s (text, a thinking block, a call's JSON object, its arguments...):
the top one is stepped until it needs more input. A frame that starts something that may
turn out not to be a call marks the scan tentative; if it fails, everything it consumed is
read again as text, so output is never lost. Once a call is announced (`begin`), its
arguments are committed: a failure then closes them (`closer`) and goes back to text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from enum import Enum

from worker.jsonscan import WS
from worker.outputs import Delta, Reasoning, Text, ToolCallArgs, ToolCallBegin
from worker.task import Tool
from worker.toolformat import ToolFormat


class Miss(Enum):
    NEED = "need"  # the text so far is a prefix of a match: wait for more
    FAIL = "fail"  # it cannot match


NEED, FAIL = Miss.NEED, Miss.FAIL
NAME_MAX = 256  # a function name, JSON key or call id is never longer than this

_STRING_TOKEN = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
# A string cut off before its closing quote (maybe inside an escape).
_STRING_PREFIX = re.compile(
    r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,3})?)?')


def match_at(buf: str, i: int, lit: str) -> bool | None:
    """True: `lit` is at buf[i:]; None: buf ends inside it; False: it is not there."""
    if buf.startswith(lit, i):
        return True
    rest = len(buf) - i
    return None if rest < len(lit) and lit.startswith(buf[i:]) else False


def match_any(buf: str, i: int, lits: Sequence[str]) -> str | Miss:
    """The one of `lits` at buf[i:], NEED if buf ends inside one of them, else FAIL."""
    need = False
    for lit in lits:
        r = match_at(buf, i, lit)
        if r:
            return lit
        need = need or r is None
    return NEED if need else FAIL


def skip_ws(buf: str, i: int) -> int:
    while i < len(buf) and buf[i] in WS:
        i += 1
    return i


def partial_tail(buf: str, marks: Sequence[str]) -> int:
    """The length of the longest end of buf that could be the start of one of `marks`."""
    best = 0
    for m in marks:
        for k in range(min(len(m) - 1, len(buf)), best, -1):
            if buf.endswith(m[:k]):
                best = k
                break
    return best


def string_at(buf: str, i: int, limit: int | None = NAME_MAX) -> tuple[str, int] | Miss:
    """The JSON string at buf[i] (its value and where it ends), NEED if buf ends inside it.
    Strings that may be keys or names fail past `limit` characters: they are never that long,
    and waiting on one would hold back (and read again) ever more text."""
    m = _STRING_TOKEN.match(buf, i)
    if m:
        value: str = json.loads(m.group())
        return value, m.end()
    m = _STRING_PREFIX.match(buf, i)
    return NEED if m and m.end() == len(buf) and (limit is None or m.end() - i <= limit) else FAIL


def first_key(buf: str, i: int) -> str | Miss:
    """The first key of the JSON object whose '{' is at buf[i]."""
    j = skip_ws(buf, i + 1)
    if j == len(buf):
        return NEED
    if buf[j] != '"':
        return FAIL
    r = string_at(buf, j)
    return r if isinstance(r, Miss) else r[0]


class Frame:
    """One level of what is being read. `step` returns False only when it needs more input."""

    def step(self, p: ToolScan) -> bool:
        raise NotImplementedError


class ObjectFrame(Frame):
    """A JSON object read member by member. Subclasses say which keys may appear, what a
    value starts, what a finished child frame means and what the closing brace does."""

    def __init__(self) -> None:
        self.phase = "open"  # open, key_or_end, key, colon, value, after, child
        self.key = ""

    def step(self, p: ToolScan) -> bool:
        if self.phase == "open":
            p.take(1)  # '{', seen by whoever pushed this frame
            self.phase = "key_or_end"
            return True
        if self.phase == "child":
            self._child_done()
            self.phase = "after"
            return True
        buf = p.skip_ws()
        if not buf:
            return p.need()
        c = buf[0]
        if c == "}" and self.phase in ("key_or_end", "after"):
            return self._end(p)
        if self.phase == "after":
            if c != ",":
                return p.fail()
            p.take(1)
            self.phase = "key"
            return True
        if self.phase in ("key_or_end", "key"):
            r = string_at(buf, 0)
            if isinstance(r, Miss):
                return p.need() if r is NEED else p.fail()
            if not self._key_ok(r[0]):
                return p.fail()
            self.key = r[0]
            p.take(r[1])
            self.phase = "colon"
            return True
        if self.phase == "colon":
            if c != ":":
                return p.fail()
            p.take(1)
            self.phase = "value"
            return True
        return self._value(p, buf, c)

    def _key_ok(self, key: str) -> bool:
        return True

    def _child_done(self) -> None:
        pass

    def _end(self, p: ToolScan) -> bool:
        raise NotImplementedError

    def _value(self, p: ToolScan, buf: str, c: str) -> bool:
        raise NotImplementedError


def empty_args() -> str:
    return "{}"


class ToolScan:
    """Input not yet decided, deltas decided, and the frames reading the input."""

    def __init__(self, fmt: ToolFormat, tools: dict[str, Tool], reason: bool,
                 new_id: Callable[[], str]) -> None:
        self.fmt = fmt
        self.tools = tools  # the only functions calls are read for
        self.reason = reason  # thinking goes to Reasoning (else it stays in the text)
        self._new_id = new_id
        self._id_ok = re.compile(fmt.id_pattern)
        self.calls = 0  # tool calls begun so far
        self.buf = ""  # input not yet processed
        self.final = False  # no more input will come
        self.stack: list[Frame] = []
        self._out: list[Delta] = []
        self._held: str | None = None  # input consumed since a tentative start (None: not tentative)
        self._skip = 0  # how much of `_held` is text if the tentative parse fails
        self.ws = ""  # trailing whitespace of the text: sent only if more text follows
        self.strip_lead = False  # drop whitespace starting the text (after </think> or a call)
        self.started = False  # something was sent: a thinking block can no longer open
        self._rws = ""  # trailing whitespace of the reasoning
        self._rfresh = True  # no reasoning sent yet in this block
        self.closer: Callable[[], str] | None = None  # completes the open call's arguments
        self._open_index = -1

    def run(self) -> None:
        while self.stack[-1].step(self):
            pass

    def flush(self) -> list[Delta]:
        """The deltas decided since the last flush, neighbours of a kind joined."""
        out: list[Delta] = []
        for d in self._out:
            prev = out[-1] if out else None
            if isinstance(d, Text) and isinstance(prev, Text):
                out[-1] = Text(prev.text + d.text)
            elif isinstance(d, Reasoning) and isinstance(prev, Reasoning):
                out[-1] = Reasoning(prev.text + d.text)
            elif isinstance(d, ToolCallArgs) and isinstance(prev, ToolCallArgs) and prev.index == d.index:
                out[-1] = ToolCallArgs(d.index, prev.text + d.text)
            else:
                out.append(d)
        self._out = []
        return out

    # -- reading ---------------------------------------------------------------------

    def take(self, n: int) -> str:
        s, self.buf = self.buf[:n], self.buf[n:]
        if self._held is not None:
            self._held += s
        return s

    def skip_ws(self) -> str:
        """Take leading whitespace; what is left of the buffer."""
        n = skip_ws(self.buf, 0)
        if n:
            self.take(n)
        return self.buf

    def push(self, frame: Frame) -> bool:
        self.stack.append(frame)
        return True

    def pop(self) -> bool:
        self.stack.pop()
        return True

    def need(self) -> bool:
        """A frame ran out of input: wait for more, or at the end give up on it."""
        if not self.final:
            return False
        return self.fail()

    def mark(self, skip: int) -> None:
        """Start a tentative parse: if it fails, the input it consumed is processed again as
        text, the first `skip` characters of it (the failed opener) taken as plain text."""
        self._held, self._skip = "", skip

    @property
    def tentative(self) -> bool:
        return self._held is not None

    def commit(self) -> None:
        self._held = None
        self.ws = ""  # whitespace before structure (a call, a JSON reply) is not text

    def fail(self) -> bool:
        """The input does not go on as the frames expected: back to text."""
        del self.stack[1:]
        self._close_call()
        if self._held is not None:
            # The opener may not have consumed its first character yet: skip it in both.
            rest, skip = self._held + self.buf, self._skip
            self._held = None
            self.buf = rest[skip:]
            if skip:
                self.text(rest[:skip])
        return True

    # -- output ----------------------------------------------------------------------

    def text(self, s: str) -> None:
        if self.strip_lead:
            s = s.lstrip(WS)
            if not s:
                return
            self.strip_lead = False
        s = self.ws + s
        body = s.rstrip(WS)
        self.ws = s[len(body):]
        if body:
            self._out.append(Text(body))
            self.started = True

    def text_raw(self, s: str) -> None:
        """Text exactly as given (the held whitespace before it included)."""
        if s:
            self._out.append(Text(self.ws + s))
            self.ws = ""
            self.strip_lead = False
            self.started = True

    def end_text(self) -> None:
        """No more text comes: whitespace held at its end is text after all."""
        if self.ws:
            self._out.append(Text(self.ws))
            self.ws = ""

    def reasoning(self, s: str) -> None:
        if not self.reason:
            self.text_raw(s)
            return
        if self._rfresh:  # whitespace around thinking is markup (templates write "<think>\n")
            s = s.lstrip(WS)
            if not s:
                return
            self._rfresh = False
        s = self._rws + s
        body = s.rstrip(WS)
        self._rws = s[len(body):]
        if body:
            self._out.append(Reasoning(body))

    def end_reasoning(self) -> None:
        self._rws, self._rfresh = "", True
        if self.reason:
            self.strip_lead = True

    def allowed(self, name: str) -> bool:
        return name in self.tools

    def begin(self, name: str, model_id: str | None) -> int:
        """Announce a call (with the model's id when its template would accept it back)."""
        index = self.calls
        self.calls += 1
        call_id = model_id if model_id and self._id_ok.fullmatch(model_id) else self._new_id()
        self._out.append(ToolCallBegin(index, call_id, name))
        self.commit()
        self.started = True
        self._open_index = index
        self.closer = empty_args
        return index

    def args(self, index: int, s: str) -> None:
        if s:
            self._out.append(ToolCallArgs(index, s))

    def _close_call(self) -> None:
        if self.closer is not None:
            self.args(self._open_index, self.closer())
            self.closer = None


class Until(Frame):
    """Text up to a closing marker, as reasoning or as visible text (thinking, harmony bodies)."""

    def __init__(self, closes: tuple[str, ...], reasoning: bool, keep_close: bool = False) -> None:
        self.closes, self.reasoning, self.keep_close = closes, reasoning, keep_close

    def _send(self, p: ToolScan, s: str) -> None:
        if self.reasoning:
            p.reasoning(s)
        else:
            p.text(s)

    def step(self, p: ToolScan) -> bool:
        buf = p.buf
        hits = [(i, c) for c in self.closes if (i := buf.find(c)) >= 0]
        if hits:
            i, close = min(hits)
            self._send(p, p.take(i))
            p.take(len(close))
            if self.keep_close:
                self._send(p, close)
            return self._done(p)
        if p.final:
            self._send(p, p.take(len(buf)))
            return self._done(p)
        n = len(buf) - partial_tail(buf, self.closes)
        if not n:
            return False
        self._send(p, p.take(n))
        return True

    def _done(self, p: ToolScan) -> bool:
        if self.reasoning:
            p.end_reasoning()
        return p.pop()
