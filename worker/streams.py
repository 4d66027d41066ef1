"""Resumable streams: the SSE bytes of each conversation, and the thread that replays them.

Three threads touch a stream. The socket thread opens it when its request arrives,
and looks up, deletes and attaches readers. The engine thread appends the bytes it
sends the client and finishes it. The pump thread sends every reader its bytes on
its own socket, so all of one reader's frames leave from one thread, in order.
One lock guards the store; nothing blocks or sends while holding it.

Offsets are absolute: byte N of a stream is byte N of what the original client
received, whatever the buffer has dropped since.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import ErrorKind, sse_error_event
from protocol.messages import (
    STREAM_REPLACED,
    BodyChunk,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    StreamSettings,
    StreamState,
)

log = logging.getLogger("modelherd.worker.streams")

SSE = "text/event-stream"
READ_CHUNK = 256 * 1024  # one frame per reader per turn: a long replay does not starve the others
OFFSET_LOST = "Stream offset lost, please restart"
NOT_FOUND = "Stream not found or expired"

Send = Callable[..., None]


class Buffer:
    """Bytes with absolute offsets, keeping exactly the newest `capacity` of them.

    Appends are kept as the chunks they came in, so dropping the oldest bytes drops
    whole chunks and trims at most one (no copying of the rest), and a read finds its
    first chunk by bisection."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.total = 0  # bytes ever appended: the absolute end offset
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0  # index of the oldest chunk still kept
        self._size = 0

    @property
    def base(self) -> int:
        """Absolute offset of the oldest byte still kept."""
        return self.total - self._size

    @property
    def kept(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if len(data) > self.capacity:
            data = data[-self.capacity:]
        self._chunks.append(data)
        self._starts.append(self.total - len(data))
        self._size += len(data)
        excess = self._size - self.capacity
        while excess > 0:
            oldest = self._chunks[self._head]
            if len(oldest) > excess:  # trim it: never keep less than capacity
                self._chunks[self._head] = oldest[excess:]
                self._starts[self._head] += excess
                self._size -= excess
                break
            excess -= len(oldest)
            self._size -= len(oldest)
            self._chunks[self._head] = b""
            self._head += 1
        if self._head > 64 and self._head * 2 > len(self._chunks):
            del self._chunks[:self._head], self._starts[:self._head]
            self._head = 0

    def read(self, offset: int, limit: int) -> list[bytes | memoryview]:
        """From absolute `offset` (base <= offset), about `limit` bytes (whole chunks past the
        first): references, not copies, so a caller holding a lock can join them after."""
        if offset >= self.total:
            return []
        i = bisect.bisect_right(self._starts, offset, lo=self._head) - 1
        first = memoryview(self._chunks[i])[offset - self._starts[i]:]
        parts: list[bytes | memoryview] = [first]
        size = len(first)
        for chunk in itertools.islice(self._chunks, i + 1, None):
            if size >= limit:
                break
            parts.append(chunk)
            size += len(chunk)
        return parts


@dataclass(eq=False)
class Stream:
    key: str
    req_id: int  # the request generating it
    stop: Callable[[str], None]  # stops that generation, with the reason its client is told
    buffer: Buffer
    started_at: float  # Unix seconds
    completed_at: float = 0.0
    expires: float = 0.0  # monotonic
    done: bool = False
    readers: int = 0

    def state(self) -> StreamState:
        return StreamState(self.key, self.done, self.buffer.total, self.started_at, self.completed_at)


@dataclass(eq=False)
class _Reader:
    req_id: int
    stream: Stream
    pos: int
    head_sent: bool = False
    allowed: int = 0  # absolute offset it may be sent up to (flow control); 0: no limit


@dataclass
class _Out:
    """One reader's frames for this turn, sent after the lock is released."""

    req_id: int
    head: bool = False
    data: list[bytes | memoryview] = field(default_factory=list)
    end: bool = False
    lost: bool = False


class StreamStore:
    def __init__(self, settings: StreamSettings, wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._wall = wall
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[str, Stream] = {}
        self._finished: OrderedDict[str, Stream] = OrderedDict()  # completion order = expiry order
        self._finished_bytes = 0  # what the finished streams keep
        self._readers: dict[int, _Reader] = {}
        self._dirty = False
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    # ---- the socket thread ------------------------------------------------------

    def open(self, key: str, req_id: int, stop: Callable[[str], None]) -> Stream:
        """A request for `key` arrived: it replaces any stream of that key, stopping it."""
        stream = Stream(key, req_id, stop, Buffer(self.settings.buffer_bytes), self._wall())
        with self._lock:
            old = self._remove(key)
            self._streams[key] = stream
        if old is not None and not old.done:
            old.stop(STREAM_REPLACED)
        return stream

    def lookup(self, keys: list[str]) -> list[StreamState]:
        with self._lock:
            self._expire_locked()
            return [s.state() for k in dict.fromkeys(keys) if (s := self._streams.get(k)) is not None]

    def delete(self, keys: list[str], reason: str) -> list[StreamState]:
        """Stop the generations (telling their clients `reason`) and free the buffers;
        returns what was there."""
        removed: list[Stream] = []
        with self._lock:
            for key in dict.fromkeys(keys):
                stream = self._remove(key)
                if stream is not None:
                    removed.append(stream)
        for stream in removed:
            if not stream.done:
                stream.stop(reason)
        return [s.state() for s in removed]

    def attach(self, req_id: int, key: str, offset: int, window: int = 0) -> tuple[ErrorKind, str] | None:
        """Start replaying `key` from `offset` to request `req_id`, `window` bytes ahead of
        what the router has written (0: no limit); the error if it cannot."""
        with self._lock:
            self._expire_locked()
            stream = self._streams.get(key)
            if stream is None:
                return ErrorKind.NOT_FOUND, NOT_FOUND
            if offset < stream.buffer.base:
                return ErrorKind.INVALID_REQUEST, OFFSET_LOST
            self._readers[req_id] = _Reader(req_id, stream, offset, allowed=offset + window if window else 0)
            stream.readers += 1
            self._poke()
        return None

    def credit(self, req_id: int, amount: int) -> None:
        """The router wrote `amount` more bytes of this replay to its client."""
        with self._lock:
            reader = self._readers.get(req_id)
            if reader is not None and reader.allowed:
                reader.allowed += amount
                self._poke()

    def detach(self, req_id: int) -> int | None:
        """A reader's client left; returns how far it had got, if it was a reader."""
        with self._lock:
            reader = self._readers.pop(req_id, None)
            if reader is None:
                return None
            reader.stream.readers -= 1
            return reader.pos

    @property
    def readers(self) -> int:
        with self._lock:
            return len(self._readers)

    # ---- the engine thread --------------------------------------------------------

    def append(self, stream: Stream, data: bytes) -> None:
        with self._lock:
            stream.buffer.append(data)
            if stream.readers:
                self._poke()

    def finish(self, stream: Stream) -> None:
        with self._lock:
            stream.done = True
            stream.completed_at = self._wall()
            stream.expires = self._clock() + self.settings.retention_s
            if self._streams.get(stream.key) is stream:
                self._finished[stream.key] = stream
                self._finished_bytes += stream.buffer.kept
                # The oldest finished go first, never the one that just finished.
                while len(self._finished) > 1 and (len(self._finished) > self.settings.max_streams
                                                   or self._finished_bytes > self.settings.max_bytes):
                    self._remove(next(iter(self._finished)))
            self._poke()  # readers must see the end, and the pump re-plans expiry

    def discard(self, stream: Stream) -> None:
        """The request failed before streaming: there is nothing to resume."""
        with self._lock:
            if self._streams.get(stream.key) is stream:
                del self._streams[stream.key]
            stream.done = True
            self._poke()

    # ---- the pump thread ------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._poke()

    def pump(self, send: Send) -> None:
        """Run until close(): send readers their bytes, free what expired. After close,
        one last turn: a reader of a stream that just finished still gets its end."""
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._wake.wait(self._next_expiry())
                    self._expire_locked()
                closing = self._closed
                self._dirty = False
                outs = [self._turn(r) for r in list(self._readers.values())]
            for out in outs:
                _emit(send, out)
            if closing:
                return

    def _turn(self, reader: _Reader) -> _Out:
        out = _Out(reader.req_id, head=not reader.head_sent)
        reader.head_sent = True
        stream = reader.stream
        if reader.pos < stream.buffer.base:  # it fell behind what the buffer keeps
            out.lost = out.end = True
        else:
            limit = READ_CHUNK if not reader.allowed else min(READ_CHUNK, reader.allowed - reader.pos)
            out.data = stream.buffer.read(reader.pos, limit) if limit > 0 else []
            reader.pos += sum(len(p) for p in out.data)
            if reader.pos < stream.buffer.total and limit > 0:
                self._dirty = True  # more to send: another turn, after the other readers
            out.end = stream.done and reader.pos >= stream.buffer.total
        if out.end:
            del self._readers[reader.req_id]
            stream.readers -= 1
        return out

    # ---- under the lock ---------------------------------------------------------------

    def _poke(self) -> None:
        self._dirty = True
        self._wake.notify()

    def _remove(self, key: str) -> Stream | None:
        stream = self._streams.pop(key, None)
        if self._finished.pop(key, None) is not None and stream is not None:
            self._finished_bytes -= stream.buffer.kept
        return stream

    def _next_expiry(self) -> float | None:
        if not self._finished:
            return None
        return max(0.0, next(iter(self._finished.values())).expires - self._clock())

    def _expire_locked(self) -> None:
        now = self._clock()
        freed = 0
        while self._finished:
            key, stream = next(iter(self._finished.items()))
            if stream.expires > now:
                break
            self._remove(key)
            freed += 1
        if freed:
            log.info("freed %d finished stream(s) past their %g s retention", freed,
                     self.settings.retention_s)


def _emit(send: Send, out: _Out) -> None:
    if out.lost and out.head:  # nothing sent yet: a plain error answer
        send(ResponseError(out.req_id, ErrorKind.INVALID_REQUEST, OFFSET_LOST))
        return
    if out.head:
        send(ResponseHead(out.req_id, 200, SSE))
    if out.lost:
        send(BodyChunk(out.req_id), sse_error_event(ErrorKind.INVALID_REQUEST, OFFSET_LOST))
    elif out.data:
        send(BodyChunk(out.req_id), b"".join(out.data))
    if out.end:
        send(ResponseEnd(out.req_id))
