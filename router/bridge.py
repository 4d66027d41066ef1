"""The router's end of the wire: one ROUTER socket and one reader task.

Response frames go to the callback each open request gave (its exchange's inbox);
every other worker message goes to the handler registered for that worker. A bad frame is logged and
dropped: the reader never dies of input.

The socket is a plain (sync) zmq socket used only from the event loop thread.
Its FD wakes the reader task, which drains every queued message without
blocking; zmq.asyncio would instead build a future per message, which costs
more than the rest of the relay on the per-token path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import cast

import zmq

from protocol.codec import ProtocolError, RouterCodec
from protocol.errors import ErrorKind
from protocol.messages import (
    BodyChunk,
    Downstream,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    ResponseStored,
    StreamStates,
    Upstream,
)

log = logging.getLogger("modelherd.bridge")

# What a request is delivered: a response message and its payload, if any.
Response = ResponseHead | BodyChunk | ResponseEnd | ResponseError | ResponseStored | StreamStates
Item = tuple[Response, bytes | None]
Deliver = Callable[[Item], None]
PeerHandler = Callable[[Upstream], None]
_RESPONSES = (ResponseHead, BodyChunk, ResponseEnd, ResponseError, ResponseStored, StreamStates)


class PeerUnreachable(Exception):
    """The worker's socket is not connected (it died, or never came up)."""


class Bridge:
    """Made idle; `start` binds the socket and starts the reader, `close` ends both."""

    def __init__(self) -> None:
        self.endpoint = ""
        self._sock: zmq.Socket[bytes] | None = None
        self._readable = asyncio.Event()
        self._codec = RouterCodec()
        self._peers: dict[bytes, PeerHandler] = {}
        self._streams: dict[int, tuple[bytes, Deliver]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        sock = self._sock = ctx.socket(zmq.ROUTER)
        # Sending to an identity that is not connected raises instead of dropping silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        self.endpoint = endpoint
        self._task = asyncio.create_task(self._read(sock), name="bridge-reader")
        self._task.add_done_callback(self._reader_done)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        # Without the reader no response can arrive: end every open request now.
        log.critical("the bridge reader died: %r", task.exception())
        self.fail_streams(None, ErrorKind.INTERNAL, "the router lost its worker link")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)

    # ---- peers and streams --------------------------------------------------

    def add_peer(self, identity: bytes, handler: PeerHandler) -> None:
        self._peers[identity] = handler

    def remove_peer(self, identity: bytes) -> None:
        self._peers.pop(identity, None)

    def open_stream(self, identity: bytes, deliver: Deliver) -> int:
        """A new request id for `identity`; its responses go to `deliver`, in order."""
        req_id = next(self._ids)
        self._streams[req_id] = (identity, deliver)
        return req_id

    def close_stream(self, req_id: int) -> None:
        self._streams.pop(req_id, None)

    def fail_streams(self, identity: bytes | None, kind: ErrorKind, message: str) -> int:
        """End every open request of one worker (None: of all) with an error; returns how many."""
        failed = 0
        for req_id, (owner, deliver) in list(self._streams.items()):
            if identity is None or owner == identity:
                deliver((ResponseError(req_id, kind, message), None))
                failed += 1
        return failed

    def send(self, identity: bytes, msg: Downstream, payload: bytes | None = None) -> None:
        """Send without awaiting: a ROUTER socket never blocks on a connected peer."""
        if identity not in self._peers:  # exited, even if zmq has not noticed the disconnect yet
            raise PeerUnreachable(f"worker {identity.decode(errors='replace')} is gone")
        frames = [identity, *self._codec.encode(msg, payload)]
        if self._sock is None:
            raise PeerUnreachable("the bridge is not started")
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            raise PeerUnreachable(f"worker {identity.decode(errors='replace')}: {exc}") from exc
        finally:
            # The zmq FD is edge-triggered and a send may consume the edge that
            # announced incoming messages: have the reader look again.
            self._readable.set()

    async def ask(self, identity: bytes, make: Callable[[int], Downstream], within: float) -> Response | None:
        """Send one request and await its one-message answer; None if the worker is gone or
        does not answer `within` seconds (a slow worker must never hang the caller)."""
        answer: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

        def deliver(item: Item) -> None:
            if not answer.done():
                answer.set_result(item[0])

        req_id = self.open_stream(identity, deliver)
        try:
            self.send(identity, make(req_id))
            async with asyncio.timeout(within):
                return await answer
        except (PeerUnreachable, TimeoutError):
            return None
        finally:
            self.close_stream(req_id)

    def tell(self, identity: bytes, msg: Downstream) -> None:
        """Send, expecting no answer (request id 0 is never open: a reply is dropped), and
        not caring if the worker is gone."""
        try:
            self.send(identity, msg)
        except PeerUnreachable:
            pass

    def connected(self, identity: bytes) -> bool:
        return identity in self._peers

    # ---- reader --------------------------------------------------------------

    async def _read(self, sock: zmq.Socket[bytes]) -> None:
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        loop.add_reader(fd, self._readable.set)
        try:
            while True:
                await self._readable.wait()
                self._readable.clear()
                while cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    self._dispatch(sock.recv_multipart(zmq.NOBLOCK))
        finally:
            loop.remove_reader(fd)

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            log.error("dropping a message without identity or header")
            return
        identity = frames[0]
        try:
            msg, payload = self._codec.decode(frames[1:])
        except ProtocolError as exc:
            log.error("dropping bad frame from %r: %s", identity, exc)
            return
        if isinstance(msg, _RESPONSES):
            stream = self._streams.get(msg.req_id)
            if stream is not None:
                stream[1]((msg, payload))
            return
        handler = self._peers.get(identity)
        if handler is None:
            log.warning("message %s from unknown worker %r", type(msg).__name__, identity)
            return
        try:
            handler(msg)
        except Exception:
            log.exception("handler for %r failed on %s", identity, type(msg).__name__)
