"""Model listing and management routes: /v1/models, /models, /models/load, /models/unload.

`/models` follows llama-server's router mode: each entry has `id` and a
`status.value` of unloaded | loading | loaded | failed, so clients written for
llama-server's model picker work unchanged. Beyond that it shows each model's
backend (llama_cpp | mlx) and, once loaded, its device (cpu | cuda | metal).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from protocol.errors import ErrorKind
from protocol.sources import redact
from router import cachefiles
from router.asgi import SSE_HEADERS, ClientGone, decode, json_response, read_body
from router.errors import HTTPError, error_response
from router.modelstate import ModelStatus
from router.pool import ModelView, Pool, PoolError
from router.progress import RESYNC, ModelEvents, download_data
from router.schema import (
    Done,
    LoadAnswer,
    MemoryBody,
    ModelBody,
    ModelList,
    ModelRef,
    ModelStatusBody,
    OpenAIModel,
    OpenAIModelList,
    OpenAIStatus,
)

MAX_MANAGEMENT_BODY = 64 * 1024


def _status(view: ModelView, now: float) -> ModelStatusBody:
    m, progress = view.model, view.progress
    status = ModelStatusBody(view.public_status, m.status is ModelStatus.FAILED)
    if m.status is ModelStatus.LOADING:
        status.progress = round(progress.value, 3)
        status.stage = progress.stage
        if progress.download is not None:
            status.download = download_data(progress.download)
    if m.wait_reason is not None:
        status.queued = m.wait_reason
    if m.failure is not None and m.status is ModelStatus.FAILED:
        status.exit_code = m.failure.exit_code
        status.message = m.failure.message
        status.log_tail = list(m.failure.log_tail)
        status.load_failures = m.failures  # in a row
        if m.retry_at > now:
            status.retry_in = round(m.retry_at - now, 1)
    return status


def _created(view: ModelView) -> int:
    try:
        return int(view.entry.path.stat().st_mtime)
    except OSError:
        return 0


def model_entry(view: ModelView, cache: cachefiles.CacheInfo | None) -> ModelBody:
    """One model as /models shows it; `cache` from cachefiles.info (read off the loop)."""
    entry = view.entry
    policy = entry.policy
    m = view.model
    info = view.info
    memory = MemoryBody(m.estimate.total if m.estimate else None, view.rss)
    out = ModelBody(
        id=entry.name, object="model", created=_created(view), owned_by="modelherd",
        aliases=list(entry.aliases), backend=entry.backend,
        # Where it comes from (a download's URL redacted) and where its files are.
        source=redact(entry.worker.download.source) if entry.worker.download else str(entry.path),
        path=str(entry.path), origin=entry.origin, mmproj=entry.worker.mmproj,
        status=_status(view, time.monotonic()),
        pid=view.worker.pid if view.worker is not None else None,
        in_flight=len(m.serving) + len(m.waiters), waiting=len(m.waiters),
        pinned=policy.pinned, ttl=policy.ttl, max_queue=policy.max_queue, memory=memory,
        cache=cache,  # a download's files, how far it got
        # Where it runs, and why not on the device it preferred (e.g. a build without GPU).
        device=info.device if info is not None else None,
        device_fallback=info.fallback if info is not None else None,
    )
    if info is not None:
        memory.backend = info.memory_bytes
        out.meta = msgspec.to_builtins(info)
    return out


async def model_ref(request: Request) -> ModelRef:
    """The body's {"model", "wait"}; HTTPError when it is not that."""
    try:
        body = await read_body(request.scope, request.receive, MAX_MANAGEMENT_BODY)
    except ClientGone:
        raise HTTPError(ErrorKind.INVALID_REQUEST, "the client left before its body arrived") from None
    ref = decode(body, ModelRef)
    if not ref.model:
        raise HTTPError(ErrorKind.INVALID_REQUEST, "invalid request: `model` must not be empty", "model")
    return ref


async def model_view(request: Request, pool: Pool) -> tuple[ModelRef, ModelView]:
    """The body's {"model", "wait"} and the model it names; HTTPError 404 if none."""
    ref = await model_ref(request)
    name = pool.resolve(ref.model)
    view = pool.view(name) if name is not None else None
    if view is None:
        raise HTTPError(ErrorKind.NOT_FOUND, f"model {ref.model!r} not found", "model")
    return ref, view


def routes(pool: Pool) -> list[Route]:
    async def list_openai(request: Request) -> Response:
        return json_response(OpenAIModelList([
            OpenAIModel(v.name, _created(v), OpenAIStatus(v.status.value)) for v in pool.views()]))

    async def list_router(request: Request) -> Response:
        views = pool.views()
        caches = await asyncio.to_thread(lambda: [cachefiles.info(v.entry) for v in views])
        return json_response(ModelList([model_entry(v, c) for v, c in zip(views, caches, strict=True)]))

    async def load(request: Request) -> Response:
        ref, view = await model_view(request, pool)
        try:
            await pool.load(view.name, ref.wait)  # a no-op load if it is already loaded
        except PoolError as exc:
            return error_response(exc.kind, exc.message, retry_after=exc.retry_after)
        cache = await asyncio.to_thread(cachefiles.info, view.entry)
        return json_response(LoadAnswer(model_entry(pool.view(view.name) or view, cache)))

    async def unload(request: Request) -> Response:
        ref = await model_ref(request)
        try:
            await pool.unload(ref.model)
        except PoolError as exc:
            return error_response(exc.kind, exc.message, "model")
        return json_response(Done())

    return [
        Route("/v1/models", list_openai, methods=["GET"]),
        Route("/models", list_router, methods=["GET"]),
        Route("/models/load", load, methods=["POST"]),
        Route("/models/unload", unload, methods=["POST"]),
    ]


def event_feed(events: ModelEvents, keepalive: float) -> Callable[[Request], Awaitable[Response]]:
    """GET /models/sse: a snapshot of every model, then their status and progress events."""

    async def feed(request: Request) -> Response:
        sub = events.subscribe()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield events.snapshot()
                while not sub.closed:
                    got = await sub.take(keepalive)
                    if got is RESYNC:  # it fell behind: what it missed, as one fresh snapshot
                        yield events.snapshot()
                    elif isinstance(got, list):
                        yield b"".join(got)
                    elif not sub.closed:
                        yield b": keepalive\n\n"
            finally:
                events.unsubscribe(sub)

        return StreamingResponse(body(), headers={k.decode(): v.decode() for k, v in SSE_HEADERS})

    return feed
