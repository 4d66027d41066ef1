"""Incremental JSON validation for streamed model output.

A tool call's arguments arrive a few characters at a time and are passed on as they come,
so the parser must know, without waiting for the end, whether the text so far can still
become valid JSON, where the value ends, and how to close it if the model stops early.
"""

from __future__ import annotations

import re

WS = " \t\n\r"

# Scanner states.
_VALUE = 0  # a value must come next
_VALUE_OR_END = 1  # just after '[': a value or ']'
_KEY_OR_END = 2  # just after '{': a key or '}'
_KEY = 3  # after ',' in an object: a key
_COLON = 4  # after a key
_AFTER = 5  # after a value: ',' or the container's end
_STRING = 6
_ESCAPE = 7  # after a backslash in a string
_UNICODE = 8  # inside \uXXXX
_NUMBER = 9
_LITERAL = 10  # inside true / false / null

# Number sub-states; the complete ones may end the number.
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_COMPLETE = (_N_ZERO, _N_INT, _N_FRAC, _N_EXP)

_STRING_STOP = re.compile(r'["\\\x00-\x1f]')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_ESCAPES = '"\\/bfnrt'
_HEX = "0123456789abcdefABCDEF"


class JsonScanner:
    """Validates one JSON value fed in pieces (RFC 8259, no extensions).

    `feed` stops at the value's end, so whatever follows it is left to the caller; `closing`
    gives the shortest text that completes what was accepted so far into a valid value.
    """

    def __init__(self) -> None:
        self._stack: list[str] = []
        self._state = _VALUE
        self._key = False  # the string being read is an object key
        self._rest = ""  # the rest of a literal still expected
        self._hex = 0  # hex digits of a \u escape still expected
        self._num = _N_MINUS
        self.consumed = 0  # characters accepted so far
        self._comma = -1  # where a trailing ',' was accepted, until the next member starts
        self.done = False
        self.error = False

    @property
    def safe(self) -> int:
        """How many accepted characters can be passed on now: all but a trailing comma (and the
        whitespace after it), which would otherwise force `closing` to invent a member."""
        return self._comma if self._comma >= 0 else self.consumed

    def feed(self, text: str, start: int = 0) -> int:
        """Accept text[start:] up to the end of the value. Returns where scanning stopped: just
        after the value (`done`), at an offending character (`error`), or at len(text)."""
        i, n = start, len(text)
        while i < n and not self.done and not self.error:
            state = self._state
            if state == _STRING:
                m = _STRING_STOP.search(text, i)
                if m is None:
                    self.consumed += n - i
                    return n
                j = m.start()
                self.consumed += j - i
                i = j
                c = text[i]
                if c == '"':
                    self._accept(1)
                    i += 1
                    if self._key:
                        self._state = _COLON
                    else:
                        self._end_value()
                elif c == "\\":
                    self._accept(1)
                    i += 1
                    self._state = _ESCAPE
                else:  # a raw control character is not allowed in a JSON string
                    self.error = True
                continue
            c = text[i]
            if state == _ESCAPE:
                if c in _ESCAPES:
                    self._state = _STRING
                elif c == "u":
                    self._state, self._hex = _UNICODE, 4
                else:
                    self.error = True
                    continue
                self._accept(1)
                i += 1
            elif state == _UNICODE:
                if c not in _HEX:
                    self.error = True
                    continue
                self._hex -= 1
                if not self._hex:
                    self._state = _STRING
                self._accept(1)
                i += 1
            elif state == _NUMBER:
                if self._number_char(c):
                    self._accept(1)
                    i += 1
                elif self._num in _N_COMPLETE:
                    self._end_value()  # the character after a number is not part of it
                else:
                    self.error = True
            elif state == _LITERAL:
                if c != self._rest[0]:
                    self.error = True
                    continue
                self._rest = self._rest[1:]
                self._accept(1)
                i += 1
                if not self._rest:
                    self._end_value()
            elif c in WS:
                self._accept(1)
                i += 1
            else:
                if not self._structural(c):
                    self.error = True
                    continue
                i += 1
        return i

    def closing(self) -> str:
        """The shortest text that, appended to the first `safe` characters, makes a valid value."""
        if self.done:
            return ""
        out = ""
        if self._comma < 0:
            state = self._state
            if state == _VALUE and self.consumed:
                out = "null"
            elif state in (_STRING, _ESCAPE, _UNICODE):
                if state == _ESCAPE:
                    out = "\\"  # the dangling backslash becomes an escaped backslash
                elif state == _UNICODE:
                    out = "0" * self._hex
                out += '"' + (":null" if self._key else "")
            elif state == _COLON:
                out = ":null"
            elif state == _NUMBER and self._num not in _N_COMPLETE:
                out = "0"
            elif state == _LITERAL:
                out = self._rest
        return out + "".join("}" if c == "{" else "]" for c in reversed(self._stack))

    def _accept(self, k: int) -> None:
        self.consumed += k

    def _structural(self, c: str) -> bool:
        """A non-whitespace character outside strings, numbers and literals."""
        state = self._state
        if state in (_VALUE, _VALUE_OR_END):
            if c == "]" and state == _VALUE_OR_END:
                return self._close()
            return self._begin_value(c)
        if state in (_KEY_OR_END, _KEY):
            if c == "}" and state == _KEY_OR_END:
                return self._close()
            if c != '"':
                return False
            self._comma = -1
            self._state, self._key = _STRING, True
            self._accept(1)
            return True
        if state == _COLON:
            if c != ":":
                return False
            self._state = _VALUE
            self._accept(1)
            return True
        # _AFTER
        if not self._stack:
            return False
        top = self._stack[-1]
        if c == ",":
            self._comma = self.consumed
            self._state = _KEY if top == "{" else _VALUE
            self._accept(1)
            return True
        return self._close() if c == ("}" if top == "{" else "]") else False

    def _begin_value(self, c: str) -> bool:
        self._comma = -1
        if c in "{[":
            self._stack.append(c)
            self._state = _KEY_OR_END if c == "{" else _VALUE_OR_END
        elif c == '"':
            self._state, self._key = _STRING, False
        elif c == "-" or (c.isdigit() and c.isascii()):
            self._state = _NUMBER
            self._num = _N_MINUS if c == "-" else _N_ZERO if c == "0" else _N_INT
        elif c in _LITERALS:
            self._state, self._rest = _LITERAL, _LITERALS[c]
        else:
            return False
        self._accept(1)
        return True

    def _close(self) -> bool:
        self._stack.pop()
        self._accept(1)
        self._end_value()
        return True

    def _end_value(self) -> None:
        self._state = _AFTER
        if not self._stack:
            self.done = True

    def _number_char(self, c: str) -> bool:
        """Advance the number sub-state on c; False if c cannot continue the number."""
        digit = "0" <= c <= "9"
        num = self._num
        if num == _N_MINUS:
            if not digit:
                return False
            self._num = _N_ZERO if c == "0" else _N_INT
        elif num in (_N_ZERO, _N_INT):
            if digit and num == _N_INT:
                pass
            elif c == ".":
                self._num = _N_DOT
            elif c in "eE":
                self._num = _N_E
            else:
                return False
        elif num in (_N_DOT, _N_FRAC):
            if digit:
                self._num = _N_FRAC
            elif c in "eE" and num == _N_FRAC:
                self._num = _N_E
            else:
                return False
        elif num == _N_E:
            if c in "+-":
                self._num = _N_ESIGN
            elif digit:
                self._num = _N_EXP
            else:
                return False
        else:  # _N_ESIGN, _N_EXP
            if not digit:
                return False
            self._num = _N_EXP
        return True
