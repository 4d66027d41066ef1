"""The conversation tracker: which exchange (and so which model and worker) owns each
resumable stream.

An entry is recorded when the POST arrives, before its model loads, so a client
that comes back early is told to retry rather than that the stream is unknown.
The tracker is bounded (least recently used goes first) and an entry expires
`retention` seconds after its stream finished, as the worker's copy does.

Ids are namespaced by the API key that started the conversation: the key a
worker sees is `owner/conv_id`, and no lookup can reach another owner's ids.
Plain data and synchronous methods only: the routes do the talking.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from starlette.types import Scope

from protocol.errors import ErrorKind
from router.errors import HTTPError
from router.exchange import Exchange

MAX_ID_CHARS = 128

# The llama.cpp web UI keys its streams `<conversation>::<model>` and looks them up
# by `<conversation>`: a lookup matches an id itself and every id it prefixes this way.
SUFFIX_SEP = "::"


# What a client is told when someone else stops its stream: a 400 while its POST still
# waits for the model, an error event once it runs (the worker's words, protocol.messages).
NOT_FOUND = "Stream not found or expired"
OWNER_LOADING = "Stream owner model is loading, retry later"
DELETED_WHILE_LOADING = "request cancelled by a stop while the model was loading"
EVICTED = "too many conversations are tracked (max_conversations) and this one was the least recently used"
EVICTED_WHILE_LOADING = f"request cancelled: {EVICTED}"
REPLACED_WHILE_LOADING = ("request cancelled: a newer request took over this conversation "
                          "while the model was loading")


@dataclass(eq=False)
class Conversation:
    key: str  # the worker's stream key: owner/conv_id
    conv_id: str
    model: str
    started_at: float  # Unix seconds
    exchange: Exchange  # the POST generating it
    done: bool = False
    completed_at: float = 0.0
    expires: float = float("inf")  # monotonic

    @property
    def worker(self) -> bytes | None:
        """The worker generating it; None while its model is not ready."""
        worker = self.exchange.worker
        return worker.identity if worker is not None else None


def conversation_id(value: str, param: str = "conv_id") -> str:
    """A valid id: 1 to 128 printable ASCII characters."""
    if not value:
        raise HTTPError(ErrorKind.INVALID_REQUEST, "Missing conversation id", param)
    if len(value) > MAX_ID_CHARS or not all(" " <= c <= "~" for c in value):
        raise HTTPError(ErrorKind.INVALID_REQUEST,
                        f"invalid conversation id: up to {MAX_ID_CHARS} printable ASCII characters", param)
    return value


def header_conversation_id(scope: Scope) -> str | None:
    """The X-Conversation-Id of a request, validated; None when it has none."""
    for name, value in scope["headers"]:
        if name == b"x-conversation-id":
            return conversation_id(value.decode("latin-1").strip(), "X-Conversation-Id")
    return None


def stream_key(owner: str, conv_id: str) -> str:
    return f"{owner}/{conv_id}"


class Tracker:
    def __init__(self, max_entries: int, retention: float,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 on_evict: Callable[[Conversation], None] | None = None) -> None:
        self.max_entries = max_entries
        # Told about an entry the bound pushed out: its stream can no longer be reached, so
        # whoever holds it should free it (and stop it, if it still runs).
        self.on_evict = on_evict
        self.retention = retention
        self._clock = clock
        self._wall = wall
        self._entries: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self._finished: OrderedDict[str, Conversation] = OrderedDict()  # finish order = expiry order
        self._prefixed: dict[str, set[str]] = {}  # "owner/conv" -> keys "owner/conv::..."

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Conversation]:
        return iter(list(self._entries.values()))

    def begin(self, conv_id: str, model: str,
              exchange: Exchange) -> tuple[Conversation, Conversation | None]:
        """Record a new POST for the conversation (`exchange.stream_key` is its key);
        returns it and the entry it replaced."""
        self._expire()
        key = exchange.stream_key
        assert key is not None
        old = self._drop(key)
        conv = Conversation(key, conv_id, model, self._wall(), exchange)
        self._entries[key] = conv
        for prefix in _prefixes(key):
            self._prefixed.setdefault(prefix, set()).add(key)
        while len(self._entries) > self.max_entries:
            evicted = self._drop(next(iter(self._entries)))
            if evicted is not None and self.on_evict is not None:
                self.on_evict(evicted)
        return conv, old

    def get(self, owner: str, conv_id: str) -> Conversation | None:
        self._expire()
        key = stream_key(owner, conv_id)
        conv = self._entries.get(key)
        if conv is not None:
            self._entries.move_to_end(key)
        return conv

    def find(self, owner: str, conv_ids: list[str]) -> list[Conversation]:
        """The entries the ids name: each id itself, and the ids it prefixes with '::'."""
        self._expire()
        found: dict[str, Conversation] = {}
        for conv_id in conv_ids:
            key = stream_key(owner, conv_id)
            for k in (key, *sorted(self._prefixed.get(key, ()))):
                if (conv := self._entries.get(k)) is not None:
                    found[k] = conv
        return list(found.values())

    def finish(self, conv: Conversation) -> None:
        """Its stream ended; it stays resumable for `retention` seconds."""
        conv.done = True
        conv.completed_at = self._wall()
        conv.expires = self._clock() + self.retention
        if self.current(conv):
            self._finished[conv.key] = conv
        self._expire()

    def remove(self, conv: Conversation) -> None:
        """Forget it, unless a newer POST for the same id has taken its place."""
        if self.current(conv):
            self._drop(conv.key)

    def current(self, conv: Conversation) -> bool:
        return self._entries.get(conv.key) is conv

    def _drop(self, key: str) -> Conversation | None:
        conv = self._entries.pop(key, None)
        if conv is None:
            return None
        self._finished.pop(key, None)
        for prefix in _prefixes(key):
            keys = self._prefixed.get(prefix)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._prefixed[prefix]
        return conv

    def _expire(self) -> None:
        now = self._clock()
        while self._finished:
            key, conv = next(iter(self._finished.items()))
            if conv.expires > now:
                return
            self._drop(key)


def _prefixes(key: str) -> list[str]:
    """'o/a::b::c' -> ['o/a', 'o/a::b']: the ids whose lookup also finds this key."""
    parts = key.split(SUFFIX_SEP)
    return [SUFFIX_SEP.join(parts[:i]) for i in range(1, len(parts))]
