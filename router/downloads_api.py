"""Routes for the download cache: POST /models/pull (download without loading),
DELETE /models?model= (remove a model's cached files) and POST /models/prune (remove
what no configured model uses)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol.errors import ErrorKind
from router import cachefiles
from router.asgi import json_response
from router.errors import error_response
from router.models_api import model_view
from router.modelstate import ModelStatus
from router.pool import Pool
from router.progress import ModelEvents
from router.pulls import Pulls
from router.schema import PullAnswer, RemoveAnswer, Removed


def routes(pool: Pool, pulls: Pulls, events: ModelEvents, cache_dir: Path) -> list[Route]:
    async def pull(request: Request) -> Response:
        ref, view = await model_view(request, pool)
        download = view.entry.worker.download
        if download is None:
            return error_response(ErrorKind.INVALID_REQUEST, f"model {ref.model!r} is a local path "
                                  f"({view.entry.path}): there is nothing to download", "model")
        task = pulls.start(view.entry.name, download)
        if ref.wait:
            failure = await asyncio.shield(task)
            if failure is not None:
                return error_response(ErrorKind.LOAD_FAILED, f"pulling {view.entry.name!r} failed: {failure}")
        cache = await asyncio.to_thread(cachefiles.info, view.entry)
        return json_response(PullAnswer(view.entry.name, not task.done(), cache))

    async def delete(request: Request) -> Response:
        name = request.query_params.get("model")
        if not name:
            return error_response(ErrorKind.INVALID_REQUEST, "give the model: DELETE /models?model=NAME",
                                  "model")
        resolved = pool.resolve(name)
        view = pool.view(resolved) if resolved is not None else None
        if view is None:
            return error_response(ErrorKind.NOT_FOUND, f"model {name!r} not found", "model")
        if view.entry.worker.download is None:
            return error_response(ErrorKind.INVALID_REQUEST, f"model {name!r} is a local path, not a "
                                  "download: modelherd does not delete files it did not fetch", "model")
        if view.status not in (ModelStatus.UNLOADED, ModelStatus.FAILED) or pulls.running(view.entry.name):
            return error_response(ErrorKind.CONFLICT, f"model {name!r} is {view.public_status}"
                                  f"{' (being pulled)' if pulls.running(view.entry.name) else ''}: "
                                  "unload it before deleting its files", "model")
        try:
            removed, freed = await asyncio.to_thread(cachefiles.remove, view.entry)
        except cachefiles.Busy as exc:
            return error_response(ErrorKind.CONFLICT, str(exc), "model")
        events.publish(view.entry.name, "model_remove", Removed(len(removed), freed))
        return json_response(RemoveAnswer(removed, freed))

    async def prune(request: Request) -> Response:
        removed, freed = await asyncio.to_thread(cachefiles.prune, cache_dir, [v.entry for v in pool.views()])
        return json_response(RemoveAnswer(removed, freed))

    return [
        Route("/models/pull", pull, methods=["POST"]),
        Route("/models", pull, methods=["POST"]),  # llama-server's download route
        Route("/models", delete, methods=["DELETE"]),
        Route("/models/prune", prune, methods=["POST"]),
    ]
