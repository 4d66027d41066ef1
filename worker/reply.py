"""One request's answer on its way to the router: the request as the engine holds it (`Job`),
the socket its frames leave by (`Sink`), and the flow control between them (`Reply`).

Flow control: no more than the window the router granted (Request.window, then each
Credit) is sent; the rest waits here, and the engine pauses the request's generation while
anything waits. Every body byte of a resumable request also goes to its stream.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from protocol.codec import WorkerCodec
from protocol.errors import ErrorKind, sse_error_event
from protocol.messages import (
    BodyChunk,
    Endpoint,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    StoredTurn,
    Upstream,
)
from worker.choice import Choice
from worker.endpoints import Generation
from worker.streams import Stream, StreamStore

SSE = "text/event-stream"


class Sink:
    """The engine thread's own DEALER to the router, for response frames only."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: str) -> None:
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, identity.encode())
        self._sock.setsockopt(zmq.LINGER, 2000)  # let the last frames out on shutdown
        self._sock.connect(endpoint)
        self._codec = WorkerCodec()

    def send(self, msg: Upstream, payload: bytes | None = None) -> None:
        self._sock.send_multipart(self._codec.encode(msg, payload), copy=False)

    def close(self) -> None:
        self._sock.close()


@dataclass(eq=False)
class Job:
    req_id: int
    endpoint: Endpoint
    body: bytes
    cancel: threading.Event
    history: Sequence[StoredTurn] = ()
    stream_key: str | None = None
    stream: Stream | None = None  # a resumable request: its bytes are kept
    detached: bool = False  # its client left; the generation goes on for the stream
    stop_reason: str | None = None  # why it was stopped, when not by its own client
    window: int = 0  # flow control: see _Reply
    credits: int = 0  # granted by the router, not yet taken by the engine thread
    finished: bool = False  # generated to its end; its last bytes may still wait for credit
    gen: Generation | None = None
    choices: list[Choice] = field(default_factory=list)
    out: list[bytes] = field(default_factory=list)  # bytes of this step, sent once per step
    received: float = field(default_factory=time.perf_counter)
    progress_sent: int = -1  # return_progress: prompt tokens reported read (-1: none yet)
    flushed_at: float = 0.0  # perf_counter of its last bytes handed to the Reply
    tokens_flushed: bool = False  # bytes made by generated tokens went out (coalescing may start)
    first_token_ms: float = 0.0  # the first choice's, for ResponseEnd
    predicted_ms: float = 0.0


class Reply:
    """One request's answer on its way to the router. Tracks whether the head went out, so a
    failure is reported the right way; every body byte of a resumable request also goes to
    its stream. Flow control: no more than the window the router granted (Request.window,
    then each Credit) is sent; the rest waits here, and the engine pauses the request's
    generation while anything waits."""

    def __init__(self, sink: Sink, job: Job, store: StreamStore) -> None:
        self.sink = sink
        self.job = job
        self.store = store
        self.content_type: str | None = None
        self.allowed = job.window  # 0: no limit
        self.sent = 0
        self.backlog: deque[bytes] = deque()
        self.end_held: ResponseEnd | None = None  # the end, behind what still waits

    @property
    def blocked(self) -> bool:
        return bool(self.backlog)

    def head(self, status: int, content_type: str) -> None:
        self.content_type = content_type
        self.sink.send(ResponseHead(self.job.req_id, status, content_type))

    def chunk(self, data: bytes) -> None:
        if not data:
            return
        if self.job.stream is not None:
            self.store.append(self.job.stream, data)
        if not self.job.detached:
            self.backlog.append(data)
            self.flush()

    def grant(self, credit: int) -> None:
        self.allowed += credit
        self.flush()

    def flush(self) -> None:
        """Send what the window allows (a chunk may overshoot it by its own size)."""
        if self.job.detached:  # nobody reads it: its bytes are in the stream already
            self.backlog.clear()
        while self.backlog and (not self.allowed or self.sent < self.allowed):
            data = self.backlog.popleft()
            self.sent += len(data)
            self.sink.send(BodyChunk(self.job.req_id), data)
        if not self.backlog and self.end_held is not None:
            self.sink.send(self.end_held)
            self.end_held = None

    def end(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        job = self.job
        stream = self.job.stream
        if stream is not None:
            if self.content_type == SSE:
                self.store.finish(stream)
            else:
                self.store.discard(stream)
        # Even when detached: the router holds a lease until it hears of the end.
        self.end_held = ResponseEnd(job.req_id, prompt_tokens, completion_tokens, job.first_token_ms,
                                    job.predicted_ms)
        self.flush()

    def fail(self, kind: ErrorKind, message: str, param: str | None = None, event: bytes | None = None,
             sizes: tuple[int, int] | None = None) -> None:
        if self.content_type is None:
            if self.job.stream is not None:
                self.store.discard(self.job.stream)
            self.sink.send(ResponseError(self.job.req_id, kind, message, param, sizes))
            return
        if self.content_type == SSE:
            self.chunk(event if event is not None else sse_error_event(kind, message))
        self.end()
