"""Routes for the download cache: POST /models/pull (download without loading),
DELETE /models?model= (remove a model's cached files) and POST /models/prune (remove
what no configured model uses)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import ErrorKind
from router import cachefiles
from router.errors import error_response
from router.models_api import model_slot
from router.pool import Pool
from router.progress import ModelEvents
from router.pulls import Pulls
from router.slots import ModelStatus


def routes(pool: Pool, pulls: Pulls, events: ModelEvents, cache_dir: Path) -> list[Route]:
    async def pull(request: Request) -> Response:
        found = await model_slot(request, pool)
        if isinstance(found, Response):
            return found
        ref, slot = found
        download = slot.entry.worker.download
        if download is None:
            return error_response(ErrorKind.INVALID_REQUEST, f"model {ref.model!r} is a local path "
                                  f"({slot.entry.path}): there is nothing to download", "model")
        task = pulls.start(slot.entry.name, download)
        if ref.wait:
            failure = await asyncio.shield(task)
            if failure is not None:
                return error_response(ErrorKind.LOAD_FAILED, f"pulling {slot.entry.name!r} failed: {failure}")
        cache = await asyncio.to_thread(cachefiles.info, slot.entry)
        return JSONResponse({"success": True, "model": slot.entry.name, "pulling": not task.done(),
                             "cache": cache.json() if cache else None})

    async def delete(request: Request) -> Response:
        name = request.query_params.get("model")
        if not name:
            return error_response(ErrorKind.INVALID_REQUEST, "give the model: DELETE /models?model=NAME",
                                  "model")
        slot = pool.slot(name)
        if slot is None:
            return error_response(ErrorKind.NOT_FOUND, f"model {name!r} not found", "model")
        if slot.entry.worker.download is None:
            return error_response(ErrorKind.INVALID_REQUEST, f"model {name!r} is a local path, not a "
                                  "download: modelherd does not delete files it did not fetch", "model")
        if slot.status not in (ModelStatus.UNLOADED, ModelStatus.FAILED) or pulls.running(slot.entry.name):
            return error_response(ErrorKind.CONFLICT, f"model {name!r} is {slot.public_status}"
                                  f"{' (being pulled)' if pulls.running(slot.entry.name) else ''}: "
                                  "unload it before deleting its files", "model")
        try:
            removed, freed = await asyncio.to_thread(cachefiles.remove, slot.entry)
        except cachefiles.Busy as exc:
            return error_response(ErrorKind.CONFLICT, str(exc), "model")
        events.publish(slot.entry.name, "model_remove", {"files": len(removed), "bytes": freed})
        return JSONResponse({"success": True, "removed": removed, "bytes": freed})

    async def prune(request: Request) -> Response:
        removed, freed = await asyncio.to_thread(cachefiles.prune, cache_dir, [s.entry for s in pool.slots()])
        return JSONResponse({"success": True, "removed": removed, "bytes": freed})

    return [
        Route("/models/pull", pull, methods=["POST"]),
        Route("/models", delete, methods=["DELETE"]),
        Route("/models/prune", prune, methods=["POST"]),
    ]
