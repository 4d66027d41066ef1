"""Relaying one worker answer to one HTTP client, as raw ASGI messages.

The worker sends a head, body chunks already rendered as the client will see
them, and an end (or an error before the head); this module writes them out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.types import Message, Receive, Send

from protocol.errors import ErrorKind, sse_error_event
from protocol.messages import BodyChunk, Cancel, Detach, Downstream, ResponseEnd, ResponseError, ResponseHead
from router.bridge import Bridge, Item, PeerUnreachable
from router.errors import HTTPError, send_error
from router.slots import WorkerHandle

SSE = "text/event-stream"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

Bound = Callable[[bytes, int], None]


async def relay(bridge: Bridge, worker: WorkerHandle, make: Callable[[int], Downstream],
                payload: bytes | None, send: Send, bound: Bound | None = None) -> bool:
    """Send `make(req_id)` and relay the answer; True if it was an event stream.
    `bound` learns the request id once the worker has the request."""
    identity = worker.identity
    req_id, queue = bridge.open_stream(identity)
    finished = False
    try:
        try:
            bridge.send(identity, make(req_id), payload)
        except PeerUnreachable as exc:
            raise HTTPError(*worker.gone_error()) from exc
        if bound is not None:
            bound(identity, req_id)
        head = await _pump(queue, send)
        finished = True
        return head is not None and head.content_type == SSE
    finally:
        bridge.close_stream(req_id)
        if not finished:  # the client left (or this task was cancelled): stop the work
            try:
                bridge.send(identity, Cancel(req_id))
            except PeerUnreachable:
                pass


async def _pump(queue: asyncio.Queue[Item], send: Send) -> ResponseHead | None:
    """Relay one response until the worker ends it; returns its head, if one came."""
    head: ResponseHead | None = None
    buffered: list[bytes] = []
    held: Item | None = None
    while True:
        item = held or await queue.get()
        held = None
        msg, payload = item
        if isinstance(msg, BodyChunk):
            if head is None or head.content_type != SSE:
                buffered.append(payload or b"")
                continue
            # Tokens that queued up while we were writing go out in one write.
            parts = [payload or b""]
            while not queue.empty():
                nxt = queue.get_nowait()
                if not isinstance(nxt[0], BodyChunk):
                    held = nxt
                    break
                parts.append(nxt[1] or b"")
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
        elif isinstance(msg, ResponseHead):
            head = msg
            if msg.content_type == SSE:
                await send({"type": "http.response.start", "status": msg.status, "headers": SSE_HEADERS})
        elif isinstance(msg, ResponseEnd):
            await _finish(send, head, buffered)
            return head
        elif isinstance(msg, ResponseError):
            if head is None:
                await send_error(send, msg.kind, msg.message, msg.param)
            elif head.content_type == SSE:
                await send({"type": "http.response.body", "body": sse_error_event(msg.kind, msg.message)})
            else:
                await send_error(send, msg.kind, msg.message)
            return head


async def _finish(send: Send, head: ResponseHead | None, buffered: list[bytes]) -> None:
    if head is None:  # the worker dropped it without an answer (it was stopping)
        await send_error(send, ErrorKind.UNAVAILABLE, "the model stopped before answering; retry")
    elif head.content_type == SSE:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        body = b"".join(buffered)
        await send({"type": "http.response.start", "status": head.status, "headers": [
            (b"content-type", head.content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


async def watch_disconnect(receive: Receive, on_gone: Callable[[], None]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    on_gone()


@contextlib.asynccontextmanager
async def while_client_stays(receive: Receive, name: str) -> AsyncIterator[None]:
    """Run the body for as long as the client stays: its leaving cancels this task wherever
    it waits (a queue, a relay, an error answer), and that cancellation ends here."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = asyncio.Event()

    def left() -> None:
        gone.set()
        handler.cancel()

    watcher = asyncio.create_task(watch_disconnect(receive, left), name=name)
    try:
        yield
    except asyncio.CancelledError:
        if not gone.is_set():
            raise
        handler.uncancel()  # our own cancellation: the client left, nothing to answer
    finally:
        watcher.cancel()


class Detachable:
    """The client end of a resumable request. When the client leaves, writes stop and the
    worker is told to stop sending (Detach), but the request goes on: its stream is kept."""

    def __init__(self, send: Send, bridge: Bridge) -> None:
        self._send = send
        self._bridge = bridge
        self._bound: tuple[bytes, int] | None = None
        self.gone = False

    async def send(self, message: Message) -> None:
        if not self.gone:
            await self._send(message)

    def bind(self, identity: bytes, req_id: int) -> None:
        self._bound = (identity, req_id)
        if self.gone:
            self._detach()

    def leave(self) -> None:
        self.gone = True
        self._detach()

    def _detach(self) -> None:
        if self._bound is None:
            return
        identity, req_id = self._bound
        try:
            self._bridge.send(identity, Detach(req_id))
        except PeerUnreachable:
            pass
