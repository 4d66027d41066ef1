"""The host-RAM prompt cache: saved KV states of conversations that lost their slot.

When a slot is given to another conversation, what it held is saved here (a copy of
its sequence state, taken by the backend), and restored when a prompt comes back that
starts with the same tokens, so that conversation's history is not read again. Entries
are found by the longest common prefix with a prompt (or by conversation key first);
the store is bounded in bytes and forgets the least recently used entries first.
Backend-independent: an entry's `state` is whatever the backend saved.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    # Compare in blocks first: prompts of thousands of tokens are compared on every request.
    block = 256
    i = 0
    while i + block <= n and a[i:i + block] == b[i:i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class Entry:
    tokens: tuple[int, ...]
    state: object
    size: int
    conversation: str | None = None


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.saves = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt: Sequence[int], conversation: str | None) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt` (the conversation's own first,
        when it still matches), and how many tokens it shares."""
        best: Entry | None = None
        best_n = 0
        best_key = -1
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, prompt)
            own = conversation is not None and entry.conversation == conversation
            if n > best_n or (own and n == best_n and n > 0):
                best, best_n, best_key = entry, n, key
        if best is not None:
            self._entries.move_to_end(best_key)
        return best, best_n

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds `tokens` or more of the same sequence."""
        return any(len(e.tokens) >= len(tokens) and common_prefix(e.tokens, tokens) == len(tokens)
                   for e in self._entries.values())

    def put(self, tokens: Sequence[int], state: object, size: int, conversation: str | None) -> bool:
        """Keep a state; entries it makes redundant (prefixes of it) go. False if it cannot
        fit at all."""
        if size > self.max_bytes:
            return False
        kept = tuple(tokens)
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(kept) and common_prefix(entry.tokens, kept) == len(entry.tokens):
                self._drop(key)
            elif conversation is not None and entry.conversation == conversation:
                self._drop(key)  # the conversation moved on: its older state is of no use
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[next(self._ids)] = Entry(kept, state, size, conversation)
        self.bytes += size
        self.saves += 1
        return True

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
