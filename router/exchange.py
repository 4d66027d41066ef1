"""One proxied request, from its place in its model's queue to the last byte its client gets.

An `Exchange` owns everything of one request: its ticket in the pool (its lease on the
model), its request id on the bridge, one inbox where everything it waits for arrives
(the pool's answer, the worker's response frames, its client leaving, a stop), whether a
client is attached, and why it stopped. `run` is the inbox's only reader; everything
else (the pool, the bridge's reader, the task watching the client, a DELETE) only puts
into it, so nothing cancels anything to pass a message.

A resumable exchange (a stream key: `X-Conversation-Id`) outlives its client: when the
client leaves, the worker is told to detach (keep generating into the stream it keeps)
and the exchange goes on holding its lease until the generation ends. A plain one tells
the worker to cancel. Either is stopped by `stop(reason)`: while it waits for its model
the client gets a 400 with the reason; once it runs, its worker ends the stream with an
error event saying why. A replay (`GET /v1/stream`) is an exchange without a lease.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Receive, Send

from protocol.errors import Dialect, ErrorKind, sse_error_event
from protocol.messages import (
    BodyChunk,
    Cancel,
    Credit,
    Detach,
    Downstream,
    Endpoint,
    Request,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    ResponseStored,
    StoredTurn,
    StreamDelete,
    StreamRead,
)
from router.asgi import SSE, SSE_HEADERS
from router.bridge import Bridge, Item, PeerUnreachable
from router.errors import send_error
from router.pool import Pool, PoolError, WorkerHandle
from router.requestlog import RequestFacts


class Phase(enum.Enum):
    WAITING = "waiting"  # for its model's worker
    RUNNING = "running"  # the worker has it
    DONE = "done"


class _ClientLeft:
    pass


@dataclass(frozen=True)
class _Stopped:
    reason: str  # told to a client attached to the running stream (an error event)
    if_waiting: str  # told to a client still waiting for the model (a 400)


_CLIENT_LEFT = _ClientLeft()
Inbox = Item | WorkerHandle | PoolError | _ClientLeft | _Stopped
_names = itertools.count(1)


class Exchange:
    def __init__(self, bridge: Bridge, message: Callable[[int], Downstream], payload: bytes | None, *,
                 pool: Pool | None = None, model: str = "", worker: WorkerHandle | None = None,
                 autoload: bool = True, stream_key: str | None = None,
                 dialect: Dialect = Dialect.OPENAI, window: int = 0,
                 facts: RequestFacts | None = None) -> None:
        self._bridge = bridge
        self._message = message
        self._payload = payload
        self._pool = pool
        self.model = model
        self.worker = worker
        self._autoload = autoload
        self.stream_key = stream_key
        self.dialect = dialect
        self.window = window
        self.facts = facts
        if facts is not None:
            facts.model = model
        self.stored: ResponseStored | None = None  # a Responses answer the worker asked to keep
        self.name = f"x{next(_names)}"
        self.phase = Phase.WAITING
        self.attached = True
        self.stop_reason: str | None = None
        self._ticket = 0
        self._req_id: int | None = None
        self._inbox = _Inbox()

    @classmethod
    def proxied(cls, pool: Pool, bridge: Bridge, model: str, endpoint: Endpoint, body: bytes, *,
                autoload: bool, stream_key: str | None = None, dialect: Dialect = Dialect.OPENAI,
                history: list[StoredTurn] | None = None, window: int = 0,
                facts: RequestFacts | None = None) -> Exchange:
        turns = history or []
        return cls(bridge, lambda req_id: Request(req_id, endpoint, stream_key, turns, window), body,
                   pool=pool, model=model, autoload=autoload, stream_key=stream_key, dialect=dialect,
                   window=window, facts=facts)

    @classmethod
    def replay(cls, bridge: Bridge, worker: WorkerHandle, key: str, offset: int, window: int = 0) -> Exchange:
        return cls(bridge, lambda req_id: StreamRead(req_id, key, offset, window), None, worker=worker,
                   window=window)

    @property
    def resumable(self) -> bool:
        return self.stream_key is not None and self._pool is not None

    # ---- what others tell it --------------------------------------------------------

    def client_left(self) -> None:
        self._inbox.put(_CLIENT_LEFT)

    def stop(self, reason: str, if_waiting: str) -> None:
        """Someone else ends it (a DELETE, a newer request for its conversation). Once it
        is done, this frees what its worker still keeps of its stream."""
        if self.phase is Phase.DONE:
            self._tell_worker(StreamDelete(0, [self.stream_key], reason) if self.stream_key else None)
            return
        self._inbox.put(_Stopped(reason, if_waiting))

    # ---- its life -------------------------------------------------------------------------

    async def run(self, send: Send, receive: Receive) -> bool:
        """Serve it; True when the answer was an event stream (something to resume)."""
        watcher = asyncio.create_task(self._watch(receive), name=f"client-watch:{self.name}")
        reply = _Reply(send, self.dialect, self.facts)
        try:
            if self._pool is not None and not await self._lease(reply):
                return False
            return await self._relay(reply)
        finally:
            watcher.cancel()  # its receive() would otherwise wait for a disconnect forever
            self.phase = Phase.DONE
            if self._req_id is not None:
                self._bridge.close_stream(self._req_id)
            if self._pool is not None:
                self._pool.release(self._ticket)

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_left()

    async def _lease(self, reply: _Reply) -> bool:
        """Wait for the model's worker; False when the request ended meanwhile."""
        assert self._pool is not None
        self._ticket = self._pool.request(self.model, self._inbox.put, autoload=self._autoload)
        while True:
            item = await self._inbox.get()
            if isinstance(item, PoolError):
                param = "model" if item.kind is ErrorKind.NOT_FOUND else None
                await reply.error(item.kind, item.message, param, item.retry_after)
                return False
            if isinstance(item, _ClientLeft):
                self.attached = reply.attached = False
                if not self.resumable:
                    return False  # leaves the queue; nothing else is affected
            elif isinstance(item, _Stopped):
                self.stop_reason = item.if_waiting
                await reply.error(ErrorKind.CANCELLED, item.if_waiting)
                return False
            elif not isinstance(item, tuple):
                self.worker = item
                return True

    async def _relay(self, reply: _Reply) -> bool:
        worker = self.worker
        assert worker is not None
        identity = worker.identity
        self._req_id = req_id = self._bridge.open_stream(identity, self._inbox.put)
        try:
            self._bridge.send(identity, self._message(req_id), self._payload)
        except PeerUnreachable:
            await reply.error(*worker.gone_error())
            return False
        self.phase = Phase.RUNNING
        if self.facts is not None:
            self.facts.dispatched = time.monotonic()
        if not self.attached:  # its client left while it waited: the stream goes on alone
            self._tell_worker(Detach(req_id))
        while True:
            item = await self._inbox.get()
            if isinstance(item, _ClientLeft):
                self.attached = reply.attached = False
                if not self.resumable:
                    self._tell_worker(Cancel(req_id))  # stops the work within a token
                    return reply.streamed
                self._tell_worker(Detach(req_id))
            elif isinstance(item, _Stopped):
                self.stop_reason = item.reason
                if self.stream_key is None:  # nothing to keep: stopping it is cancelling it
                    self._tell_worker(Cancel(req_id))
                    return reply.streamed
                self._tell_worker(StreamDelete(0, [self.stream_key], item.reason))
            elif isinstance(item, tuple) and isinstance(item[0], ResponseStored):
                self.stored = item[0]
            elif isinstance(item, tuple):
                done = await reply.write(item, self._inbox.chunks)
                if done:
                    return reply.streamed
                self._credit(req_id, reply)

    def _credit(self, req_id: int, reply: _Reply) -> None:
        """Flow control: what reached the client (or, for an answer sent whole, the router's
        buffer) may be replaced by as much from the worker, granted in quarters of the
        window so a stream costs one credit message per quarter, not one per token."""
        if self.window and reply.taken >= self.window // 4:
            self._tell_worker(Credit(req_id, reply.taken))
            reply.taken = 0

    def _tell_worker(self, msg: Downstream | None) -> None:
        if msg is not None and self.worker is not None:
            self._bridge.tell(self.worker.identity, msg)


class _Reply:
    """Writes one worker answer to the client as raw ASGI messages: an event stream as it
    comes, anything else once whole (with its length). Nothing is written once the client
    has left."""

    def __init__(self, send: Send, dialect: Dialect, facts: RequestFacts | None = None) -> None:
        self._send = send
        self._dialect = dialect
        self._facts = facts
        self.attached = True
        self.head: ResponseHead | None = None
        self._buffered: list[bytes] = []
        self.taken = 0  # body bytes written (or buffered) since the last credit

    @property
    def streamed(self) -> bool:
        return self.head is not None and self.head.content_type == SSE

    async def write(self, item: Item, more: Callable[[], list[bytes]]) -> bool:
        """Relay one frame; True when it ended the answer. `more` takes the body chunks
        queued right behind it."""
        msg, payload = item
        if isinstance(msg, BodyChunk):
            if not self.streamed:
                self._buffered.append(payload or b"")
                self.taken += len(payload or b"")
                return False
            # Tokens that queued up while we were writing go out in one write.
            body = b"".join([payload or b"", *more()])
            await self._out({"type": "http.response.body", "body": body, "more_body": True})
            self.taken += len(body)  # written: the transport held it back if the client was slow
            return False
        if isinstance(msg, ResponseHead):
            self.head = msg
            if msg.content_type == SSE:
                if self._facts is not None:
                    self._facts.streamed = True
                await self._out({"type": "http.response.start", "status": msg.status, "headers": SSE_HEADERS})
            return False
        if isinstance(msg, ResponseEnd):
            if self._facts is not None:
                self._facts.prompt_tokens = msg.prompt_tokens
                self._facts.completion_tokens = msg.completion_tokens
                self._facts.first_token_ms = msg.first_token_ms
                self._facts.predicted_ms = msg.predicted_ms
            await self._finish()
            return True
        if isinstance(msg, ResponseError):
            if self.streamed:
                event = sse_error_event(msg.kind, msg.message, self._dialect)
                await self._out({"type": "http.response.body", "body": event})
            else:
                await self.error(msg.kind, msg.message, msg.param, sizes=msg.sizes)
            return True
        return False

    async def _finish(self) -> None:
        head = self.head
        if head is None:  # the worker dropped it without an answer (it was stopping)
            await self.error(ErrorKind.UNAVAILABLE, "the model stopped before answering; retry")
        elif self.streamed:
            await self._out({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            body = b"".join(self._buffered)
            await self._out({"type": "http.response.start", "status": head.status, "headers": [
                (b"content-type", head.content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ]})
            await self._out({"type": "http.response.body", "body": body})

    async def error(self, kind: ErrorKind, message: str, param: str | None = None,
                    retry_after: int | None = None, sizes: tuple[int, int] | None = None) -> None:
        if self.attached:
            await send_error(self._send, kind, message, param, retry_after, self._dialect, sizes)

    async def _out(self, message: dict[str, object]) -> None:
        if self.attached:
            await self._send(message)


class _Inbox:
    """Everything an exchange waits for, in arrival order, for one reader."""

    def __init__(self) -> None:
        self._items: deque[Inbox] = deque()
        self._ready = asyncio.Event()

    def put(self, item: Inbox) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Inbox:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def chunks(self) -> list[bytes]:
        """The body chunks at the head of the inbox, taken out."""
        out = []
        items = self._items
        while items and isinstance(head := items[0], tuple) and isinstance(head[0], BodyChunk):
            items.popleft()
            out.append(head[1] or b"")
        return out
