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
from protocol.sources import redact, shard_names
from router import cachefiles
from router.asgi import SSE_HEADERS, ClientGone, decode, json_response, read_body
from router.auth import may_use
from router.builtin import package_of
from router.catalog import ModelEntry
from router.config import ConfigError
from router.errors import HTTPError, error_response
from router.modelstate import ModelStatus
from router.pool import ModelView, Pool, PoolError
from router.progress import RESYNC, ModelEvents, download_data
from router.schema import (
    Architecture,
    Done,
    LoadAnswer,
    MemoryBody,
    ModelBody,
    ModelList,
    ModelRef,
    ModelStatusBody,
    PromptCacheBody,
    Reloaded,
    SlotsBody,
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


def _source(entry: ModelEntry) -> str:
    if entry.worker.download is not None:
        return redact(entry.worker.download.source)
    package = package_of(entry.path) if entry.origin == "builtin" else None
    return f"package {package}" if package is not None else str(entry.path)


def _created(view: ModelView) -> int:
    try:
        return int(view.entry.path.stat().st_mtime)
    except OSError:
        return 0


def _local_size(entry: ModelEntry) -> int | None:
    """Bytes of a local model's files: every shard of a split GGUF, an MLX folder's files."""
    path = entry.path
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return sum(path.with_name(name).stat().st_size for name in shard_names(path.name))
    except OSError:
        return None


def model_entry(view: ModelView, cache: cachefiles.CacheInfo | None) -> ModelBody:
    """One model as /models shows it; `cache` from cachefiles.info (read off the loop)."""
    entry = view.entry
    policy = entry.policy
    m = view.model
    info = view.info
    memory = MemoryBody(m.estimate.total if m.estimate else None, view.rss)
    now = time.monotonic()
    out = ModelBody(
        id=entry.name, object="model", created=_created(view), owned_by="modelherd",
        aliases=list(entry.aliases), tags=list(entry.tags), architecture=Architecture(),
        backend=entry.backend,
        # Where it comes from (a download's URL redacted, the Python package an embedded
        # model ships in) and where its files are.
        source=_source(entry),
        path=str(entry.path), origin=entry.origin, mmproj=entry.worker.mmproj,
        status=_status(view, now),
        pid=view.worker.pid if view.worker is not None else None,
        in_flight=len(m.serving) + len(m.waiters), waiting=len(m.waiters),
        pinned=policy.pinned, ttl=policy.ttl, max_queue=policy.max_queue, memory=memory,
        cache=cache,  # a download's files, how far it got
        # Where it runs, and why not on the device it preferred (e.g. a build without GPU).
        device=info.device if info is not None else None,
        device_fallback=info.fallback if info is not None else None,
        size=cache.bytes if cache is not None else _local_size(entry),
    )
    if m.status is ModelStatus.LOADED and not m.busy and m.last_used:
        out.idle_s = round(max(0.0, now - m.last_used), 1)  # the scheduler's clock is monotonic
    status = view.worker.status if view.worker is not None and info is not None else None
    if status is not None:
        out.slots = SlotsBody(status.slots_busy, status.slots_total, status.queued)
        out.prompt_cache = PromptCacheBody(status.cache_entries, status.cache_bytes, status.cache_hits,
                                           status.cache_misses)
    if info is not None:
        memory.backend = info.memory_bytes
        # llama-server's keys (its web UI reads n_ctx and size) beside modelherd's.
        out.meta = {**msgspec.to_builtins(info), "size": info.file_size}
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
    view = pool.view(name) if name is not None and may_use(request.scope, name) else None
    if view is None:
        raise HTTPError(ErrorKind.NOT_FOUND, f"model {ref.model!r} not found", "model")
    return ref, view


def routes(pool: Pool, runtime_reload: Callable[[], list[str]]) -> list[Route]:
    async def list_models(request: Request) -> Response:
        """/models and /v1/models (as llama-server's router answers both): OpenAI's list,
        each entry with llama-server's fields and modelherd's."""
        views = [v for v in pool.views() if may_use(request.scope, v.name)]
        caches = await asyncio.to_thread(lambda: [cachefiles.info(v.entry) for v in views])
        return json_response(ModelList([model_entry(v, c) for v, c in zip(views, caches, strict=True)]))

    async def retrieve(request: Request) -> Response:
        """GET /v1/models/{id} (the openai client's models.retrieve); ids may hold slashes."""
        name = pool.resolve(request.path_params["model"])
        view = pool.view(name) if name is not None and may_use(request.scope, name) else None
        if view is None:
            return error_response(ErrorKind.NOT_FOUND, f"model {request.path_params['model']!r} not found",
                                  "model")
        cache = await asyncio.to_thread(cachefiles.info, view.entry)
        return json_response(model_entry(view, cache))

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

    async def reload(request: Request) -> Response:
        """POST /models/reload (admin): as SIGHUP does."""
        try:
            names = runtime_reload()
        except ConfigError as exc:
            return error_response(ErrorKind.INVALID_REQUEST, f"reload failed; the running configuration "
                                  f"stays: {exc}")
        return json_response(Reloaded(names))

    return [
        Route("/models/reload", reload, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve, methods=["GET"]),
        Route("/models/load", load, methods=["POST"]),
        Route("/models/unload", unload, methods=["POST"]),
    ]


def event_feed(events: ModelEvents, keepalive: float) -> Callable[[Request], Awaitable[Response]]:
    """GET /models/sse: a snapshot of every model, then their status and progress events."""

    async def feed(request: Request) -> Response:
        if request.method == "HEAD":
            # The headers a GET would get, then the end: a HEAD has no body to stream, and a feed
            # that never ends would hold the connection (and a subscriber) forever.
            head = Response(status_code=200)
            head.raw_headers = list(SSE_HEADERS)  # no content-length: the GET's body has no size
            return head
        sub = events.subscribe()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield events.snapshot(sub)
                while not sub.closed:
                    got = await sub.take(keepalive)
                    if got is RESYNC:  # it fell behind: what it missed, as one fresh snapshot
                        yield events.snapshot(sub)
                    elif isinstance(got, list):
                        yield b"".join(got)
                    elif not sub.closed:
                        yield b": keepalive\n\n"
            finally:
                events.unsubscribe(sub)

        return StreamingResponse(body(), headers={k.decode(): v.decode() for k, v in SSE_HEADERS})

    return feed
