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
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol.errors import ErrorKind, param_of
from protocol.sources import redact
from router import cachefiles
from router.errors import HTTPError, error_response
from router.pool import Pool
from router.progress import RESYNC, ModelEvents, download_data
from router.proxy import ClientGone, read_body
from router.relay import SSE_HEADERS
from router.slots import ModelStatus, PoolError, Slot

MAX_MANAGEMENT_BODY = 64 * 1024


class _ModelRef(msgspec.Struct):
    model: str
    wait: bool = False


def _status(slot: Slot, now: float) -> dict[str, Any]:
    status: dict[str, Any] = {"value": slot.public_status, "failed": slot.status is ModelStatus.FAILED}
    if slot.status is ModelStatus.LOADING:
        status["progress"] = round(slot.progress, 3)
        status["stage"] = slot.stage
        if slot.download is not None:
            status["download"] = download_data(slot.download)
    if slot.wait_reason is not None:
        status["queued"] = slot.wait_reason
    if slot.failure is not None and slot.status is ModelStatus.FAILED:
        status["exit_code"] = slot.failure.exit_code
        status["message"] = slot.failure.message
        status["log_tail"] = slot.failure.log_tail
        status["load_failures"] = slot.failures  # in a row
        if slot.retry_at > now:
            status["retry_in"] = round(slot.retry_at - now, 1)
    return status


def _created(slot: Slot) -> int:
    try:
        return int(slot.entry.path.stat().st_mtime)
    except OSError:
        return 0


def model_entry(pool: Pool, slot: Slot, cache: cachefiles.CacheInfo | None) -> dict[str, Any]:
    """One model as /models shows it; `cache` from cachefiles.info (read off the loop)."""
    entry = slot.entry
    policy = entry.policy
    out: dict[str, Any] = {
        "id": entry.name,
        "object": "model",
        "created": _created(slot),
        "owned_by": "modelherd",
        "aliases": list(entry.aliases),
        "backend": entry.backend,
        # Where it comes from (a download's URL redacted) and where its files are.
        "source": redact(entry.worker.download.source) if entry.worker.download else str(entry.path),
        "path": str(entry.path),
        "origin": entry.origin,
        "mmproj": entry.worker.mmproj,
        "status": _status(slot, time.monotonic()),
        "pid": slot.worker.pid if slot.worker is not None else None,
        "in_flight": slot.in_flight,
        "waiting": slot.waiting,
        "pinned": policy.pinned,
        "ttl": policy.ttl,
        "max_queue": policy.max_queue,
        "memory": {"estimate": slot.estimate.total if slot.estimate else None, "rss": pool.rss(slot)},
    }
    out["cache"] = cache.json() if cache is not None else None  # a download's files, how far it got
    info = slot.info if slot.status is ModelStatus.LOADED else None
    # Where it runs, and why not on the device it preferred (e.g. a build without GPU).
    out["device"] = info.device if info is not None else None
    out["device_fallback"] = info.fallback if info is not None else None
    if info is not None:
        out["memory"]["backend"] = info.memory_bytes
        out["meta"] = msgspec.to_builtins(info)
    return out


async def model_ref(request: Request) -> _ModelRef | Response:
    try:
        body = await read_body(request.scope, request.receive, MAX_MANAGEMENT_BODY)
        return msgspec.json.decode(body, type=_ModelRef)
    except HTTPError as exc:
        return error_response(exc.kind, exc.message)
    except ClientGone:
        return Response(status_code=400)
    except msgspec.ValidationError as exc:
        return error_response(ErrorKind.INVALID_REQUEST, f"invalid request: {exc}",
                              param_of(str(exc)) or "model")
    except msgspec.DecodeError as exc:
        return error_response(ErrorKind.INVALID_REQUEST, f"malformed JSON body: {exc}")


async def model_slot(request: Request, pool: Pool) -> tuple[_ModelRef, Slot] | Response:
    """The body's {"model", "wait"} and the model it names, or the error response."""
    ref = await model_ref(request)
    if isinstance(ref, Response):
        return ref
    slot = pool.slot(ref.model)
    if slot is None:
        return error_response(ErrorKind.NOT_FOUND, f"model {ref.model!r} not found", "model")
    return ref, slot


def routes(pool: Pool) -> list[Route]:
    async def list_openai(request: Request) -> Response:
        data = [{"id": s.entry.name, "object": "model", "created": _created(s), "owned_by": "modelherd",
                 "status": {"value": s.status.value}} for s in pool.slots()]
        return JSONResponse({"object": "list", "data": data})

    async def list_router(request: Request) -> Response:
        slots = pool.slots()
        caches = await asyncio.to_thread(lambda: [cachefiles.info(s.entry) for s in slots])
        return JSONResponse({"object": "list", "data": [model_entry(pool, s, c) for s, c in zip(
            slots, caches, strict=True)]})

    async def load(request: Request) -> Response:
        found = await model_slot(request, pool)
        if isinstance(found, Response):
            return found
        ref, slot = found
        try:
            if ref.wait:
                await pool.load(slot)
            else:
                pool.start_load(slot)  # a no-op load if it is already loaded
        except PoolError as exc:
            return error_response(exc.kind, exc.message, retry_after=exc.retry_after)
        cache = await asyncio.to_thread(cachefiles.info, slot.entry)
        return JSONResponse({"success": True, "model": model_entry(pool, slot, cache)})

    async def unload(request: Request) -> Response:
        ref = await model_ref(request)
        if isinstance(ref, Response):
            return ref
        try:
            await pool.unload(ref.model)
        except PoolError as exc:
            return error_response(exc.kind, exc.message, "model")
        return JSONResponse({"success": True})

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
