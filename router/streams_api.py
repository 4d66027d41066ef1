"""Resumable streams over HTTP, on llama-server's routes and with its messages.

    GET    /v1/stream?conv_id=ID&from=N   (or /v1/stream/{ID})  replay from byte N, then follow
    POST   /v1/streams/lookup             {"conversation_ids": [...]} -> [{...}, ...]
    DELETE /v1/stream?conv_id=ID          stop and free; always 204

The tracker says which exchange, and so which worker, owns a conversation. Only the
owners of the named ids are asked, in parallel, each within `fanout_timeout`: a slow
or dead worker makes its ids absent, it never holds up the answer. (A POST that makes
a stream is the proxy's: router.proxy.)
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind
from protocol.messages import STREAM_DELETED, StreamLookup, StreamState, StreamStates
from router.asgi import SSE_HEADERS, ClientGone, RawEndpoint, decode, json_response, read_body
from router.auth import owner
from router.bridge import Bridge
from router.convs import (
    DELETED_WHILE_LOADING,
    EVICTED,
    EVICTED_WHILE_LOADING,
    NOT_FOUND,
    OWNER_LOADING,
    Conversation,
    Tracker,
    conversation_id,
)
from router.errors import HTTPError
from router.exchange import Exchange
from router.pool import WorkerHandle
from router.schema import LookupBody, LookupEntry

MAX_LOOKUP_IDS = 1024
MAX_LOOKUP_BODY = 256 * 1024
LOADING_RETRY_S = 2  # llama.cpp's web UI retries a resume every 2 s


class Streams:
    def __init__(self, bridge: Bridge, tracker: Tracker, fanout_timeout: float, window: int = 0) -> None:
        self.window = window
        self.bridge = bridge
        self.tracker = tracker
        self.fanout_timeout = fanout_timeout
        tracker.on_evict = self._evicted

    def _evicted(self, conv: Conversation) -> None:
        """The tracker's bound pushed `conv` out: nobody can reach its stream any more."""
        conv.exchange.stop(EVICTED, EVICTED_WHILE_LOADING)

    # ---- GET ------------------------------------------------------------------------

    async def read(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            params = QueryParams(scope["query_string"])
            conv_id = conversation_id(scope["path_params"].get("conv_id") or params.get("conv_id", ""))
            offset = _offset(params.get("from", ""))
            conv, worker = self._owner(owner(scope), conv_id)
        except HTTPError as exc:
            await exc.send(send)
            return
        if scope["method"] == "HEAD":  # the stream exists and is ready: no body to follow
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return
        # A reader leaving ends only this replay: the worker drops the reader, the stream goes on.
        await Exchange.replay(self.bridge, worker, conv.key, offset, self.window).run(send, receive)

    def _owner(self, who: str, conv_id: str) -> tuple[Conversation, WorkerHandle]:
        conv = self.tracker.get(who, conv_id)
        if conv is None:
            raise HTTPError(ErrorKind.NOT_FOUND, NOT_FOUND)
        if conv.worker is None:
            raise HTTPError(ErrorKind.UNAVAILABLE, OWNER_LOADING, retry_after=LOADING_RETRY_S)
        worker = self._worker(conv)
        if worker is None:  # its model was unloaded or its worker died since: the stream is gone
            self.tracker.remove(conv)
            raise HTTPError(ErrorKind.NOT_FOUND, NOT_FOUND)
        return conv, worker

    def _worker(self, conv: Conversation) -> WorkerHandle | None:
        worker = conv.exchange.worker
        if worker is None or not worker.alive or not self.bridge.connected(worker.identity):
            return None
        return worker

    # ---- lookup -------------------------------------------------------------------------

    async def lookup(self, request: Request) -> Response:
        ids = await _lookup_ids(request)
        found = self.tracker.find(owner(request.scope), ids)
        by_worker: dict[bytes, list[Conversation]] = {}
        out: list[LookupEntry] = []
        for conv in found:
            if conv.worker is None:  # its POST still waits for the model
                out.append(_entry(conv, StreamState(conv.key, False, 0, conv.started_at, 0.0)))
            else:
                by_worker.setdefault(conv.worker, []).append(conv)
        answers = await asyncio.gather(*(self._lookup(w, convs) for w, convs in by_worker.items()))
        for pairs in answers:
            out.extend(_entry(conv, state) for conv, state in pairs)
        return json_response(out)

    async def _lookup(self, worker: bytes,
                      convs: list[Conversation]) -> list[tuple[Conversation, StreamState]]:
        keys = [c.key for c in convs]
        answer = await self.bridge.ask(worker, lambda req_id: StreamLookup(req_id, keys), self.fanout_timeout)
        if not isinstance(answer, StreamStates):
            if not self.bridge.connected(worker):  # gone, with its streams: forget them
                for conv in convs:
                    self.tracker.remove(conv)
            return []  # slow or gone: its ids are absent
        states = {s.key: s for s in answer.states}
        for conv in convs:
            if conv.key not in states:  # the worker answered without it: expired there
                self.tracker.remove(conv)
        return [(c, states[c.key]) for c in convs if c.key in states]

    # ---- DELETE ---------------------------------------------------------------------------

    async def delete(self, request: Request) -> Response:
        params = request.query_params
        conv_id = conversation_id(request.path_params.get("conv_id") or params.get("conv_id", ""))
        conv = self.tracker.get(owner(request.scope), conv_id)
        if conv is not None:
            self.tracker.remove(conv)
            conv.exchange.stop(STREAM_DELETED, DELETED_WHILE_LOADING)
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        read = RawEndpoint(self.read)
        return [
            Route("/v1/stream", read, methods=["GET"]),
            Route("/v1/stream/{conv_id:path}", read, methods=["GET"]),
            Route("/v1/stream", self.delete, methods=["DELETE"]),
            Route("/v1/stream/{conv_id:path}", self.delete, methods=["DELETE"]),
            Route("/v1/streams/lookup", self.lookup, methods=["POST"]),
        ]


def _offset(raw: str) -> int:
    if raw == "":
        return 0
    # 18 digits: any real offset fits, and nothing bigger reaches int() or msgpack.
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise HTTPError(ErrorKind.INVALID_REQUEST, "Invalid 'from' offset", "from")
    return int(raw)


async def _lookup_ids(request: Request) -> list[str]:
    try:
        body = await read_body(request.scope, request.receive, MAX_LOOKUP_BODY)
    except ClientGone:
        return []
    try:
        ids = decode(body, LookupBody).conversation_ids
    except HTTPError as exc:
        raise HTTPError(ErrorKind.INVALID_REQUEST,
                        f'invalid body: expected {{"conversation_ids": [string, ...]}} ({exc.message})',
                        "conversation_ids") from exc
    if len(ids) > MAX_LOOKUP_IDS:
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"at most {MAX_LOOKUP_IDS} conversation ids per lookup",
                        "conversation_ids")
    return [conversation_id(i, "conversation_ids") for i in ids]


def _entry(conv: Conversation, state: StreamState) -> LookupEntry:
    return LookupEntry(conv.conv_id, state.is_done, state.total_bytes, int(state.started_at),
                       int(state.completed_at))
