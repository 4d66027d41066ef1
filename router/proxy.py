"""The hot path: the OpenAI routes that proxy a request to its model's worker.

The router reads the body once, peeks at `model` and `stream`, and hands the
raw bytes to the worker. The worker answers with a head, body chunks already
rendered as the client will see them, and an end; this module only relays.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind, param_of, sse_error_event
from protocol.messages import BodyChunk, Cancel, Endpoint, Request, ResponseEnd, ResponseError, ResponseHead
from router.bridge import Bridge, Item, PeerUnreachable
from router.errors import HTTPError, send_error
from router.pool import Pool
from router.slots import PoolError, WorkerHandle

log = logging.getLogger("modelherd.proxy")

SSE = "text/event-stream"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Routed(msgspec.Struct):
    """The only fields the router reads; the rest is the worker's to validate."""

    model: str
    stream: bool = False


class ClientGone(Exception):
    pass


class OpenAIRoute:
    """Pure ASGI app for one proxied route (chat, completions or embeddings)."""

    def __init__(self, endpoint: Endpoint, pool: Pool, bridge: Bridge,
                 max_body: int, autoload: bool) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._bridge = bridge
        self._max_body = max_body
        self._autoload = autoload
        self._routed = msgspec.json.Decoder(_Routed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self._max_body)
            routed = parse_routed(self._routed, body)
        except HTTPError as exc:
            await send_error(send, exc.kind, exc.message, exc.param)
            return
        except ClientGone:
            return
        # From here on a disconnect cancels this task, wherever it waits: in the queue
        # for its model (leaving it, so nothing else is affected) or mid-generation
        # (relay's cleanup then tells the worker to stop).
        handler = asyncio.current_task()
        assert handler is not None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, handler, gone),
                                      name=f"disconnect-watch:{id(scope)}")
        try:
            try:
                async with self._pool.lease(routed.model, self._autoload) as worker:
                    await relay(self._bridge, worker, self._endpoint, body, send)
            except HTTPError as exc:
                await send_error(send, exc.kind, exc.message, exc.param)
            except PoolError as exc:
                await send_error(send, exc.kind, exc.message,
                                 "model" if exc.kind is ErrorKind.NOT_FOUND else None, exc.retry_after)
        except asyncio.CancelledError:  # wherever it lands, the error answer included
            if not gone.is_set():
                raise
            handler.uncancel()  # our own cancellation: the client left, nothing to answer
        finally:
            watcher.cancel()


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise HTTPError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(ErrorKind.TOO_LARGE, f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_routed(decoder: msgspec.json.Decoder[_Routed], body: bytes) -> _Routed:
    try:
        routed = decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if text.startswith("Expected `object`"):
            raise HTTPError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object") from exc
        param = "model" if "`model`" in text else param_of(text)
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"invalid request: {text}", param) from exc
    except msgspec.DecodeError as exc:
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"malformed JSON body: {exc}") from exc
    if not routed.model:
        raise HTTPError(ErrorKind.INVALID_REQUEST, "invalid request: `model` must not be empty", "model")
    return routed


async def relay(bridge: Bridge, worker: WorkerHandle, endpoint: Endpoint, body: bytes, send: Send) -> None:
    identity = worker.identity
    req_id, queue = bridge.open_stream(identity)
    finished = False
    try:
        try:
            bridge.send(identity, Request(req_id, endpoint), body)
        except PeerUnreachable as exc:
            raise HTTPError(*worker.gone_error()) from exc
        await _pump(queue, send)
        finished = True
    finally:
        bridge.close_stream(req_id)
        if not finished:  # the client left (or this task was cancelled): stop generating
            try:
                bridge.send(identity, Cancel(req_id))
            except PeerUnreachable:
                pass


async def _pump(queue: asyncio.Queue[Item], send: Send) -> None:
    """Relay one response until the worker ends it."""
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
                await send({"type": "http.response.start", "status": msg.status, "headers": _SSE_HEADERS})
        elif isinstance(msg, ResponseEnd):
            await _finish(send, head, buffered)
            return
        elif isinstance(msg, ResponseError):
            if head is None:
                await send_error(send, msg.kind, msg.message, msg.param)
            elif head.content_type == SSE:
                await send({"type": "http.response.body", "body": sse_error_event(msg.kind, msg.message)})
            else:
                await send_error(send, msg.kind, msg.message)
            return


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


async def _watch_disconnect(receive: Receive, handler: asyncio.Task[object], gone: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    handler.cancel()
