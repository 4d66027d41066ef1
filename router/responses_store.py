"""Stored Responses API answers (`store: true`), for `previous_response_id` and
`GET`/`DELETE /v1/responses/{id}`.

Each entry is one exchange (the request body and the Response object the worker rendered)
and the id of the response it continued, so a chain of turns can be replayed to a worker.
Entries are private to the API key that made them: another key's lookup finds nothing.
The store is bounded by count and by bytes; the oldest entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocol.errors import ErrorKind
from protocol.messages import StoredTurn
from router.errors import HTTPError

MAX_CHAIN = 256  # turns replayed at most: a longer history is cut at its oldest end


@dataclass(frozen=True)
class _Entry:
    turn: StoredTurn
    previous: str | None

    @property
    def size(self) -> int:
        return len(self.turn.request) + len(self.turn.response)


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # oldest first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, owner: str, response_id: str, turn: StoredTurn, previous: str | None) -> None:
        entry = _Entry(turn, previous)
        if entry.size > self.max_bytes:
            return
        self._drop((owner, response_id))
        self._entries[(owner, response_id)] = entry
        self.bytes += entry.size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, owner: str, response_id: str) -> StoredTurn | None:
        entry = self._entries.get((owner, response_id))
        return entry.turn if entry is not None else None

    def delete(self, owner: str, response_id: str) -> bool:
        return self._drop((owner, response_id))

    def history(self, owner: str, previous: str | None) -> list[StoredTurn]:
        """The turns a request continuing `previous` builds on, oldest first; a 404 in
        the API's words when `previous` is unknown (to this key)."""
        if previous is None:
            return []
        turns: list[StoredTurn] = []
        seen: set[str] = set()
        current: str | None = previous
        while current is not None and current not in seen and len(turns) < MAX_CHAIN:
            entry = self._entries.get((owner, current))
            if entry is None:
                if not turns:
                    raise HTTPError(ErrorKind.NOT_FOUND, f"Previous response with id '{previous}' not found.",
                                    "previous_response_id")
                break  # an older turn was dropped by the bound: the history starts after it
            seen.add(current)
            turns.append(entry.turn)
            current = entry.previous
        turns.reverse()
        return turns

    def _drop(self, key: tuple[str, str]) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True
