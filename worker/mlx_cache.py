"""The MLX prompt cache: the caches of finished sequences, kept in memory for reuse.

MLX sequences do not keep a slot's cache between requests as llama.cpp's do: a sequence
leaves mlx-lm's batch with its own cache (a list of per-layer caches), and that cache
comes here with the tokens it holds. A new sequence starts from the entry sharing the
longest prefix with its prompt (its conversation's on a tie) and evaluates only the rest.

Unlike worker.prompt_cache (llama.cpp's states, which can always be cut), an entry may
be untrimmable: a recurrent layer's state (LFM2, Mamba) or a sliding window that has
wrapped cannot be cut back to a shorter prefix, only continued. Such an entry serves a
prompt only when the prompt holds all of its tokens and more; that is why the slots also
keep a checkpoint of such a sequence's prompt (its state before the last prompt token),
and why a longer untrimmable entry does not make the shorter ones it extends redundant.
Bounded in bytes; the least recently used entries go first.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.prompt_cache import common_prefix


@dataclass(eq=False)
class Entry:
    tokens: tuple[int, ...]
    cache: list[Any]  # mlx-lm's per-layer caches; never changed once here (users copy to cut)
    size: int
    trimmable: bool
    conversation: str | None
    origin: int  # the request that made it: a sequence's checkpoint and its final state share it


class MlxPromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, prompt: Sequence[int], conversation: str | None) -> tuple[Entry | None, int]:
        """The entry that saves the most of `prompt`, and how many tokens of it to keep (at
        most all but the prompt's last token: sampling starts from its logits). An entry
        that would have to be cut serves only if it can be. Counts a hit or a miss."""
        best: Entry | None = None
        best_rank = (0, False, False)
        best_key = -1
        limit = len(prompt) - 1
        for key, entry in self._entries.items():  # oldest first: a later equal rank wins
            keep = min(common_prefix(entry.tokens, prompt), limit)
            whole = keep == len(entry.tokens)
            if keep <= 0 or not (whole or entry.trimmable):
                continue
            own = conversation is not None and entry.conversation == conversation
            rank = (keep, own, whole)  # then the most recent: no copy to cut is cheaper
            if rank >= best_rank:
                best, best_rank, best_key = entry, rank, key
        if best is None:
            self.misses += 1
            return None, 0
        self.hits += 1
        self._entries.move_to_end(best_key)
        return best, best_rank[0]

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry holds exactly these tokens already."""
        return any(e.tokens == tuple(tokens) for e in self._entries.values())

    def put(self, tokens: Sequence[int], cache: list[Any], size: int, trimmable: bool,
            conversation: str | None, origin: int) -> bool:
        """Keep a cache; entries it makes redundant go. False if it cannot fit at all."""
        if size > self.max_bytes or not tokens:
            return False
        kept = tuple(tokens)
        for key, entry in list(self._entries.items()):
            prefix = len(entry.tokens) <= len(kept) and common_prefix(entry.tokens, kept) == len(entry.tokens)
            # A trimmable cache serves whatever its prefixes served; an untrimmable one does
            # not serve a prompt that leaves it part way.
            if prefix and (trimmable or len(entry.tokens) == len(kept)):
                self._drop(key)
            elif conversation is not None and entry.conversation == conversation and entry.origin != origin:
                self._drop(key)  # the conversation moved on: its older states are of no use
        while self._entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[next(self._ids)] = Entry(kept, cache, size, trimmable, conversation, origin)
        self.bytes += size
        return True

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
