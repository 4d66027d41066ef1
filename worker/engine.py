"""The generation thread: runs requests one at a time, off the socket thread.

The socket thread calls `submit` and `cancel`; both only touch a queue and a
per-request `threading.Event`, so they never wait on generation. The engine
thread sends responses on its own DEALER socket (`Sink`) straight to the
router, whose reader dispatches them by request id: no second thread touches a
token on its way out, and each zmq socket is used only by the thread that made it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain

import zmq

from protocol.codec import WorkerCodec
from protocol.errors import ErrorKind, sse_error_event
from protocol.messages import BodyChunk, Endpoint, ResponseEnd, ResponseError, ResponseHead, Upstream
from worker import render
from worker.backend import Backend, Finish, GenParams
from worker.schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    RequestInvalid,
    message_text,
    parse,
)
from worker.streams import Stream, StreamStore

log = logging.getLogger("modelherd.worker.engine")

SSE = "text/event-stream"
FLUSH_INTERVAL_S = 0.001
JSON = "application/json"
# OpenAI's seed is any integer; both backends take 32 bits, and llama.cpp reads 0xFFFFFFFF
# as "pick a random seed", so seeds are taken modulo 2**32 - 1.
SEED_RANGE = 2**32 - 1


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
    stream: Stream | None = None  # a resumable request: its bytes are kept
    detached: bool = False  # its client left; the generation goes on for the stream
    stop_reason: str | None = None  # why it was stopped, when not by its own client


class _Reply:
    """Tracks whether the head went out, so a failure is reported the right way.
    Every body byte of a resumable request also goes to its stream."""

    def __init__(self, sink: Sink, job: Job, store: StreamStore) -> None:
        self.sink = sink
        self.req_id = job.req_id
        self.job = job
        self.store = store
        self.content_type: str | None = None

    def head(self, status: int, content_type: str) -> None:
        self.content_type = content_type
        self.sink.send(ResponseHead(self.req_id, status, content_type))

    def chunk(self, data: bytes) -> None:
        if self.job.stream is not None:
            self.store.append(self.job.stream, data)
        if not self.job.detached:
            self.sink.send(BodyChunk(self.req_id), data)

    def end(self) -> None:
        stream = self.job.stream
        if stream is not None:
            if self.content_type == SSE:
                self.store.finish(stream)
            else:
                self.store.discard(stream)
        self.sink.send(ResponseEnd(self.req_id))  # even when detached: the router holds a lease

    def fail(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        if self.content_type is None:
            if self.job.stream is not None:
                self.store.discard(self.job.stream)
            self.sink.send(ResponseError(self.req_id, kind, message, param))
            return
        if self.content_type == SSE:
            self.chunk(sse_error_event(kind, message))
        self.end()


class Engine:
    def __init__(self, backend: Backend, model_name: str, n_vocab: int,
                 sink_factory: Callable[[], Sink], streams: StreamStore) -> None:
        self._backend = backend
        self._model = model_name
        self._n_vocab = n_vocab
        self._sink_factory = sink_factory
        self._streams = streams
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending: dict[int, Job] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False  # cancels from here on are the worker's, not the client's
        self.active = 0

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet (running or queued)."""
        with self._lock:
            return len(self._pending)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._pending) - self.active

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Cancel everything and wait for the thread; False if it is still busy (it may be
        inside a prompt evaluation, which cannot be interrupted)."""
        self._stopping = True
        with self._lock:
            for job in self._pending.values():
                job.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def submit(self, req_id: int, endpoint: Endpoint, body: bytes, stream_key: str | None = None) -> None:
        job = Job(req_id, endpoint, body, threading.Event())
        if stream_key is not None:
            # Opened now, not when generation starts: a DELETE while this waits in the
            # queue must find it (and a newer request for the key replaces it).
            job.stream = self._streams.open(stream_key, req_id, lambda why: self.cancel(req_id, why))
        with self._lock:
            self._pending[req_id] = job
        self._jobs.put(job)

    def cancel(self, req_id: int, reason: str | None = None) -> None:
        """Stop a request: its client left (no reason), or someone else stopped it."""
        with self._lock:
            job = self._pending.get(req_id)
        if job is not None:
            if reason is not None and job.stop_reason is None:
                job.stop_reason = reason
            job.cancel.set()

    def detach(self, req_id: int) -> None:
        """The client of a resumable request left: generate on, into its stream only."""
        with self._lock:
            job = self._pending.get(req_id)
        if job is not None:
            job.detached = True
            log.info("request %d: its client left; generating on into its conversation stream", req_id)

    # ---- engine thread -----------------------------------------------------

    def _run(self) -> None:
        sink = self._sink_factory()
        try:
            while (job := self._jobs.get()) is not None:
                self.active = 1
                try:
                    self._serve(sink, job)
                finally:
                    self.active = 0
                    with self._lock:
                        self._pending.pop(job.req_id, None)
        finally:
            sink.close()

    def _serve(self, sink: Sink, job: Job) -> None:
        reply = _Reply(sink, job, self._streams)
        if job.cancel.is_set():
            self._cancelled(reply, job, None)
            return
        try:
            if job.endpoint is Endpoint.EMBEDDING:
                self._embed(reply, job)
            else:
                self._generate(reply, job)
        except RequestInvalid as exc:
            reply.fail(exc.kind, exc.message, exc.param)
        except Exception as exc:  # a backend bug must not take the worker down
            log.exception("request %d failed", job.req_id)
            reply.fail(ErrorKind.INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")

    def _generate(self, reply: _Reply, job: Job) -> None:
        chat = job.endpoint is Endpoint.CHAT
        req: ChatRequest | CompletionRequest
        if chat:
            req = creq = parse(job.body, ChatRequest)
            params = self._params(creq)
            messages = [{"role": m.role, "content": message_text(m)} for m in creq.messages]
            gen = self._backend.chat(messages, params, job.cancel)
        else:
            req = preq = parse(job.body, CompletionRequest)
            params = self._params(preq)
            prompt = preq.prompt if isinstance(preq.prompt, str) else preq.prompt[0]
            gen = self._backend.complete(prompt, params, job.cancel)
        try:
            first = next(gen)  # prompt errors (too long, bad grammar) surface here, before any head
            items = chain([first], gen)
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                self._stream(reply, job, render.StreamRenderer(self._model, chat, usage), items)
            else:
                self._collect(reply, job, chat, items)
        finally:
            gen.close()

    def _stream(self, reply: _Reply, job: Job, renderer: render.StreamRenderer,
                items: chain[str | Finish]) -> None:
        reply.head(200, SSE)
        lead = renderer.start()
        # Tokens that come faster than one per FLUSH_INTERVAL_S leave in small batches:
        # per-message cost, not bytes, is what a stream spends. The first token, and
        # every token of a model slower than that, is sent the moment it exists.
        pending: list[bytes] = []
        last_flush = 0.0
        for item in items:
            if isinstance(item, Finish):
                if job.cancel.is_set():
                    self._cancelled(reply, job, item)
                    return
                pending.append(lead + renderer.finish(item))
                reply.chunk(b"".join(pending))
                break
            if job.cancel.is_set():
                continue
            pending.append(lead + renderer.piece(item))
            lead = b""
            now = time.monotonic()
            if now - last_flush >= FLUSH_INTERVAL_S:
                reply.chunk(b"".join(pending) if len(pending) > 1 else pending[0])
                pending.clear()
                last_flush = now
        reply.end()

    def _collect(self, reply: _Reply, job: Job, chat: bool, items: chain[str | Finish]) -> None:
        parts: list[str] = []
        for item in items:
            if not isinstance(item, Finish):
                parts.append(item)
                continue
            if job.cancel.is_set():
                self._cancelled(reply, job, item)
                return
            body = (render.chat_response if chat else render.completion_response)(
                self._model, "".join(parts), item)
            reply.head(200, JSON)
            reply.chunk(body)
            reply.end()
            return
        raise RuntimeError("backend generation ended without a Finish")

    def _cancelled(self, reply: _Reply, job: Job, finish: Finish | None) -> None:
        tokens = finish.completion_tokens if finish else 0
        if self._stopping:
            # The worker is being stopped: the client did nothing wrong and may retry.
            log.info("request %d stopped by shutdown after %d tokens", job.req_id, tokens)
            reply.fail(ErrorKind.UNAVAILABLE, "the model was unloaded while generating; retry")
            return
        if job.stop_reason is not None:  # a DELETE, or a newer request for its conversation
            log.info("request %d stopped after %d tokens: %s", job.req_id, tokens, job.stop_reason)
            reply.fail(ErrorKind.CANCELLED, f"request stopped: {job.stop_reason}")
            return
        # The client went away. The backend stops within one token; tests read this line.
        log.info("request %d cancelled after %d tokens", job.req_id, tokens)
        reply.end()

    def _embed(self, reply: _Reply, job: Job) -> None:
        req = parse(job.body, EmbeddingRequest)
        inputs = [req.input] if isinstance(req.input, str) else req.input
        result = self._backend.embed(inputs)
        body = render.embeddings_response(self._model, result, req.encoding_format)
        reply.head(200, JSON)
        reply.chunk(body)
        reply.end()

    def _params(self, req: ChatRequest | CompletionRequest) -> GenParams:
        max_tokens = req.max_tokens
        json_schema = None
        json_object = False
        if isinstance(req, ChatRequest):
            max_tokens = req.max_completion_tokens or max_tokens
            fmt = req.response_format
            if fmt is not None and fmt.type != "text":
                if req.grammar is not None:
                    raise RequestInvalid("use either grammar or response_format, not both",
                                         param="grammar")
                json_schema = fmt.json_schema.schema if fmt.json_schema else fmt.schema
                json_object = json_schema is None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        bias: dict[int, float] = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= self._n_vocab:
                raise RequestInvalid(
                    f"logit_bias key {key!r} is not a token id of this model (0..{self._n_vocab - 1})",
                    param="logit_bias")
            bias[int(key)] = value
        defaults = GenParams()
        return GenParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if req.temperature is None else req.temperature,
            top_p=defaults.top_p if req.top_p is None else req.top_p,
            top_k=defaults.top_k if req.top_k is None else req.top_k,
            min_p=defaults.min_p if req.min_p is None else req.min_p,
            seed=None if req.seed is None else req.seed % SEED_RANGE,
            stop=stop,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repeat_penalty=req.repeat_penalty or defaults.repeat_penalty,
            logit_bias=bias,
            grammar=req.grammar,
            json_schema=json_schema,
            json_object=json_object,
        )
