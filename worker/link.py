"""The worker's socket thread: handshake, load, then control traffic.

This thread owns the control DEALER (handshake, progress, requests, cancels,
heartbeats). Response frames leave from the engine thread's own DEALER.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import zmq

from protocol.codec import ProtocolError, WorkerCodec
from protocol.errors import ErrorKind
from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Configure,
    Credit,
    Detach,
    Download,
    Heartbeat,
    Hello,
    LoadFailed,
    LoadProgress,
    Ready,
    Request,
    ResponseError,
    Shutdown,
    StreamDelete,
    StreamLookup,
    StreamRead,
    StreamStates,
    Upstream,
)
from worker.backends import make_backend
from worker.download import relay
from worker.endpoints import Endpoints
from worker.engine import Engine
from worker.reply import Sink
from worker.streams import StreamStore

log = logging.getLogger("modelherd.worker")

CONFIGURE_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.05
STOP_TIMEOUT_S = 5.0
DRAIN_POLL_MS = 20  # how soon a draining worker notices its last request finished

EXIT_OK = 0
EXIT_NO_CONFIG = 2
EXIT_LOAD_FAILED = 3


class Link:
    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, worker_id: str) -> None:
        self._ctx = ctx
        self._codec = WorkerCodec()
        self._worker_id = worker_id
        self._dealer = ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.ROUTING_ID, worker_id.encode())
        self._dealer.setsockopt(zmq.LINGER, 1000)
        self._dealer.connect(endpoint)
        self._endpoint = endpoint
        self._shutdown_requested = False

    def serve(self) -> int:
        try:
            return self._serve()
        finally:
            self._dealer.close()

    def _serve(self) -> int:
        self._send(Hello(PROTOCOL_VERSION, os.getpid(), self._worker_id))
        configure = self._await_configure()
        if configure is None:
            return EXIT_NO_CONFIG
        config = configure.model
        if config.download is not None:
            failure = self._download(config.download)
            if self._shutdown_requested:
                return EXIT_OK  # unloaded while downloading: the .part stays for a resume
            if failure is not None:
                log.error("downloading %s failed: %s", config.name, failure)
                self._send(LoadFailed(ErrorKind.LOAD_FAILED, failure))
                return EXIT_LOAD_FAILED
        try:
            backend = make_backend(config.backend)
            info = backend.load(config, self._progress_reporter())
        except Exception as exc:
            if self._shutdown_requested:
                return EXIT_OK
            log.error("loading %s failed: %s", config.path, exc)
            self._send(LoadFailed(ErrorKind.LOAD_FAILED, f"{type(exc).__name__}: {exc}"))
            return EXIT_LOAD_FAILED
        if self._shutdown_requested:
            return EXIT_OK
        self._send(Ready(info))
        log.info("loaded %s (%s on %s, n_ctx=%d)", config.name, info.backend, info.device, info.n_ctx)
        if info.fallback:
            log.warning("%s: %s", config.name, info.fallback)
        store = StreamStore(configure.streams)
        pump = threading.Thread(target=self._pump_streams, args=(store,), name="streams", daemon=True)
        pump.start()
        endpoints = Endpoints(backend, config, info, getattr(backend, "chat_template", None))
        engine = Engine(backend, endpoints,
                        lambda: Sink(self._ctx, self._endpoint, self._worker_id + ":out"), store)
        engine.start()
        try:
            self._relay(engine, store)
        finally:
            store.close()
            pump.join(STOP_TIMEOUT_S)
            if not engine.stop(STOP_TIMEOUT_S):
                # Still inside llama.cpp: freeing the model under it would be a use-after-free,
                # and zmq could not terminate with its socket open. Leave now.
                log.warning("generation did not stop within %.0f s; exiting without cleanup",
                            STOP_TIMEOUT_S)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_OK)
            backend.close()
        return EXIT_OK

    def _pump_streams(self, store: StreamStore) -> None:
        sink = Sink(self._ctx, self._endpoint, self._worker_id + ":streams")
        try:
            store.pump(sink.send)
        finally:
            sink.close()

    def _await_configure(self) -> Configure | None:
        deadline = time.monotonic() + CONFIGURE_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self._dealer.poll(int(left * 1000)):
                break
            msg, _ = self._recv()
            if isinstance(msg, Configure):
                return msg
            if isinstance(msg, Shutdown):
                return None
        log.error("no Configure from the router within %.0f s", CONFIGURE_TIMEOUT_S)
        return None

    def _download(self, download: Download) -> str | None:
        """Fetch the model while listening for a Shutdown (which cancels it); None when
        every file is in the cache, else why not."""

        def cancelled(wait_s: float) -> bool:
            if self._dealer.poll(int(wait_s * 1000)) and isinstance(self._recv()[0], Shutdown):
                self._shutdown_requested = True
            return self._shutdown_requested

        return relay(download, self._send, cancelled)

    def _progress_reporter(self) -> Callable[[str, float], bool]:
        last = [0.0]

        def report(stage: str, value: float) -> bool:
            now = time.monotonic()
            if value in (0.0, 1.0) or now - last[0] >= PROGRESS_INTERVAL_S:
                last[0] = now
                self._send(LoadProgress(stage, value))
            # A Shutdown during the load aborts it (returning False stops llama.cpp).
            while self._dealer.poll(0):
                if isinstance(self._recv()[0], Shutdown):
                    self._shutdown_requested = True
            return not self._shutdown_requested

        return report

    def _relay(self, engine: Engine, store: StreamStore) -> None:
        draining = False
        while True:
            # After a Shutdown, what was submitted finishes (the router's grace period is
            # for that) while cancels still arrive; then the worker exits.
            if draining and engine.pending == 0 and not store.readers:
                return
            if draining and not self._dealer.poll(DRAIN_POLL_MS):
                continue
            msg, payload = self._recv()
            if isinstance(msg, Request):
                engine.submit(msg.req_id, msg.endpoint, payload, msg.stream_key, msg.history, msg.window)
            elif isinstance(msg, Credit):
                engine.credit(msg.req_id, msg.bytes)
                store.credit(msg.req_id, msg.bytes)
            elif isinstance(msg, Cancel):
                engine.cancel(msg.req_id)
                if (pos := store.detach(msg.req_id)) is not None:
                    log.info("request %d: the stream's reader left at byte %d", msg.req_id, pos)
            elif isinstance(msg, Detach):
                engine.detach(msg.req_id)
            elif isinstance(msg, StreamRead):
                failure = store.attach(msg.req_id, msg.key, msg.offset, msg.window)
                if failure is not None:
                    self._send(ResponseError(msg.req_id, *failure))
                else:
                    log.info("request %d: replaying a conversation stream from byte %d",
                             msg.req_id, msg.offset)
            elif isinstance(msg, StreamLookup):
                self._send(StreamStates(msg.req_id, store.lookup(msg.keys)))
            elif isinstance(msg, StreamDelete):
                self._send(StreamStates(msg.req_id, store.delete(msg.keys, msg.reason)))
            elif isinstance(msg, Heartbeat):
                self._send(Heartbeat(msg.seq))
                self._send(engine.status())
            elif isinstance(msg, Shutdown) and not draining:
                log.info("shutdown requested (%s): finishing %d request(s) first",
                         msg.reason or "no reason given", engine.pending)
                draining = True

    def _recv(self) -> tuple[object, bytes]:
        try:
            msg, payload = self._codec.decode(self._dealer.recv_multipart())
        except ProtocolError as exc:
            log.error("dropping bad frame from router: %s", exc)
            return None, b""
        return msg, payload or b""

    def _send(self, msg: Upstream) -> None:
        self._dealer.send_multipart(self._codec.encode(msg))
