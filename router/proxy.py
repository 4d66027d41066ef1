"""The hot path: the OpenAI routes that proxy a request to its model's worker.

The router reads the body once, peeks at `model` and `stream`, and hands the
raw bytes to the worker, whose answer `relay` writes out unchanged.

A streaming request with `X-Conversation-Id` is resumable: it is recorded in
the conversation tracker before its model loads, and when its client leaves it
goes on (the worker keeps the bytes) instead of being cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind, param_of
from protocol.messages import Endpoint, Request
from router.auth import owner
from router.bridge import Bridge
from router.convs import header_conversation_id
from router.errors import HTTPError, send_error
from router.pool import Pool
from router.relay import Detachable, relay, watch_disconnect, while_client_stays
from router.slots import PoolError

if TYPE_CHECKING:
    from router.streams_api import Streams

log = logging.getLogger("modelherd.proxy")


class _Routed(msgspec.Struct):
    """The only fields the router reads; the rest is the worker's to validate."""

    model: str
    stream: bool = False


class ClientGone(Exception):
    pass


class OpenAIRoute:
    """Pure ASGI app for one proxied route (chat, completions or embeddings)."""

    def __init__(self, endpoint: Endpoint, pool: Pool, bridge: Bridge, streams: Streams,
                 max_body: int, autoload: bool) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._bridge = bridge
        self._streams = streams
        self._max_body = max_body
        self._autoload = autoload
        self._routed = msgspec.json.Decoder(_Routed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self._max_body)
            routed = parse_routed(self._routed, body)
            conv_id = None
            if self._endpoint is not Endpoint.EMBEDDING:
                conv_id = header_conversation_id(scope)
        except HTTPError as exc:
            await exc.send(send)
            return
        except ClientGone:
            return
        if conv_id is not None and routed.stream:
            await self._resumable(scope, receive, send, body, routed.model, conv_id)
            return
        # From here on a disconnect cancels this task, wherever it waits: in the queue
        # for its model (leaving it, so nothing else is affected) or mid-generation
        # (relay's cleanup then tells the worker to stop).
        async with while_client_stays(receive, f"disconnect-watch:{id(scope)}"):
            await self._serve(routed.model, body, send)

    async def _serve(self, model: str, body: bytes, send: Send, stream_key: str | None = None,
                     bound: Callable[[bytes, int], None] | None = None,
                     on_lease: Callable[[bytes], None] | None = None) -> bool:
        """Lease the model's worker and relay its answer; True if that was an event stream."""
        endpoint = self._endpoint
        try:
            async with self._pool.lease(model, self._autoload) as worker:
                if on_lease is not None:
                    on_lease(worker.identity)
                return await relay(self._bridge, worker, lambda req_id: Request(req_id, endpoint, stream_key),
                                   body, send, bound)
        except HTTPError as exc:
            await exc.send(send)
        except PoolError as exc:
            await send_error(send, exc.kind, exc.message,
                             "model" if exc.kind is ErrorKind.NOT_FOUND else None, exc.retry_after)
        return False

    async def _resumable(self, scope: Scope, receive: Receive, send: Send, body: bytes,
                         model: str, conv_id: str) -> None:
        """A resumable POST: its client leaving detaches it instead of cancelling it. It holds
        its lease until the generation ends, so the pool sees the model busy meanwhile."""
        if self._pool.slot(model) is None:  # before the takeover: a typo must not stop a stream
            await send_error(send, ErrorKind.NOT_FOUND, f"model {model!r} not found", "model")
            return
        handler = asyncio.current_task()
        assert handler is not None
        tracker = self._streams.tracker
        # Recorded before anything is awaited: a client coming back early is told to retry.
        conv, old = tracker.begin(owner(scope), conv_id, model, handler)
        out = Detachable(send, self._bridge)
        watcher = asyncio.create_task(watch_disconnect(receive, out.leave), name=f"detach-watch:{id(scope)}")
        streamed = False
        try:
            if old is not None:  # one live stream per conversation: the older one stops first
                await self._streams.take_over(old)
            streamed = await self._serve(model, body, out.send, conv.key, out.bind,
                                         lambda identity: tracker.assign(conv, identity))
        except asyncio.CancelledError:
            if conv.stop_reason is None:
                raise
            handler.uncancel()  # a DELETE, or a newer POST for the id, while this one waited
            await send_error(out.send, ErrorKind.CANCELLED, conv.stop_reason)
        finally:
            watcher.cancel()
            if streamed:
                tracker.finish(conv)
            else:  # no stream came of it (an error answer): nothing to resume
                tracker.remove(conv)


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
