"""Resumable streams over HTTP, on llama-server's routes and with its messages.

    GET    /v1/stream?conv_id=ID&from=N   (or /v1/stream/{ID})  replay from byte N, then follow
    POST   /v1/streams/lookup             {"conversation_ids": [...]} -> [{...}, ...]
    DELETE /v1/stream?conv_id=ID          stop and free; always 204

The tracker says which worker owns a conversation. Only the owners of the named
ids are asked, in parallel, each within `fanout_timeout`: a slow or dead worker
makes its ids absent, it never holds up the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind
from protocol.messages import (
    STREAM_DELETED,
    STREAM_REPLACED,
    StreamDelete,
    StreamLookup,
    StreamRead,
    StreamState,
    StreamStates,
)
from router.auth import owner
from router.bridge import Bridge
from router.convs import Conversation, Tracker, conversation_id
from router.errors import HTTPError
from router.pool import Pool
from router.proxy import ClientGone, read_body
from router.relay import SSE_HEADERS, relay, while_client_stays
from router.slots import WorkerHandle

MAX_LOOKUP_IDS = 1024
MAX_LOOKUP_BODY = 256 * 1024
LOADING_RETRY_S = 2  # llama.cpp's web UI retries a resume every 2 s

NOT_FOUND = "Stream not found or expired"
OWNER_LOADING = "Stream owner model is loading, retry later"
DELETED_WHILE_LOADING = "request cancelled by a stop while the model was loading"
EVICTED = "too many conversations are tracked (max_conversations) and this one was the least recently used"
EVICTED_WHILE_LOADING = f"request cancelled: {EVICTED}"
REPLACED_WHILE_LOADING = ("request cancelled: a newer request took over this conversation "
                          "while the model was loading")


class _LookupBody(msgspec.Struct):
    conversation_ids: list[str]


class Streams:
    def __init__(self, pool: Pool, bridge: Bridge, tracker: Tracker, fanout_timeout: float) -> None:
        self.pool = pool
        self.bridge = bridge
        self.tracker = tracker
        self.fanout_timeout = fanout_timeout
        tracker.on_evict = self._evicted

    # ---- the POST side ----------------------------------------------------------------

    async def take_over(self, old: Conversation) -> None:
        """A new POST took the id of `old`: stop old's stream, on whichever model it runs."""
        await self._stop(old, REPLACED_WHILE_LOADING, STREAM_REPLACED)

    async def _stop(self, conv: Conversation, if_waiting: str, if_running: str) -> None:
        """Stop its POST, which is told why: `if_waiting` if it still waits for its model
        (a 400), else `if_running` (an error event on the stream)."""
        if conv.worker is None:
            _cancel_waiting(conv, if_waiting)
            return
        key = conv.key
        await self.bridge.ask(conv.worker, lambda req_id: StreamDelete(req_id, [key], if_running),
                              self.fanout_timeout)

    def _evicted(self, conv: Conversation) -> None:
        """The tracker's bound pushed `conv` out: nobody can reach its stream any more. Its
        worker is told without waiting for the answer (this runs inside the tracker)."""
        if conv.worker is None:
            _cancel_waiting(conv, EVICTED_WHILE_LOADING)
        else:
            self.bridge.tell(conv.worker, StreamDelete(0, [conv.key], EVICTED))

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
        key = conv.key
        # A reader leaving cancels only this replay: relay tells the worker to drop the
        # reader, and the stream goes on.
        async with while_client_stays(receive, f"stream-watch:{id(scope)}"):
            try:
                await relay(self.bridge, worker, lambda req_id: StreamRead(req_id, key, offset), None, send)
            except HTTPError as exc:
                await exc.send(send)

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
        slot = self.pool.slot(conv.model)
        worker = slot.worker if slot is not None else None
        if worker is None or worker.identity != conv.worker or not self.bridge.connected(worker.identity):
            return None
        return worker

    # ---- lookup -------------------------------------------------------------------------

    async def lookup(self, request: Request) -> Response:
        ids = await _lookup_ids(request)
        found = self.tracker.find(owner(request.scope), ids)
        waiting = [c for c in found if c.worker is None]
        by_worker: dict[bytes, list[Conversation]] = {}
        for conv in found:
            if conv.worker is not None:
                by_worker.setdefault(conv.worker, []).append(conv)
        answers = await asyncio.gather(*(self._lookup(w, convs) for w, convs in by_worker.items()))
        out = [_entry(c, StreamState(c.key, False, 0, c.started_at, 0.0)) for c in waiting]
        for pairs in answers:
            out.extend(_entry(conv, state) for conv, state in pairs)
        return JSONResponse(out)

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
            await self._stop(conv, DELETED_WHILE_LOADING, STREAM_DELETED)
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        read = _Raw(self.read)
        return [
            Route("/v1/stream", read, methods=["GET"]),
            Route("/v1/stream/{conv_id:path}", read, methods=["GET"]),
            Route("/v1/stream", self.delete, methods=["DELETE"]),
            Route("/v1/stream/{conv_id:path}", self.delete, methods=["DELETE"]),
            Route("/v1/streams/lookup", self.lookup, methods=["POST"]),
        ]


def _cancel_waiting(conv: Conversation, reason: str) -> None:
    """End a POST still waiting for its model; it answers 400 with `reason`."""
    if conv.post is not None and not conv.post.done():
        conv.stop_reason = reason
        conv.post.cancel()


class _Raw:
    """A pure ASGI endpoint. (Starlette would run a bound method as request -> response.)"""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


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
        ids = msgspec.json.decode(body, type=_LookupBody).conversation_ids
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise HTTPError(ErrorKind.INVALID_REQUEST,
                        f'invalid body: expected {{"conversation_ids": [string, ...]}} ({exc})',
                        "conversation_ids") from exc
    if len(ids) > MAX_LOOKUP_IDS:
        raise HTTPError(ErrorKind.INVALID_REQUEST, f"at most {MAX_LOOKUP_IDS} conversation ids per lookup",
                        "conversation_ids")
    return [conversation_id(i, "conversation_ids") for i in ids]


def _entry(conv: Conversation, state: StreamState) -> dict[str, Any]:
    return {
        "conversation_id": conv.conv_id,
        "is_done": state.is_done,
        "total_bytes": state.total_bytes,
        "started_at": int(state.started_at),
        "completed_at": int(state.completed_at),
    }
