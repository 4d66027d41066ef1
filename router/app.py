"""The Starlette application: routes, middleware, OpenAI-shaped errors, lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol.errors import ErrorKind
from protocol.messages import Endpoint
from router import downloads_api, models_api
from router.auth import APIKeyMiddleware
from router.bridge import Bridge
from router.config import Settings
from router.convs import Tracker
from router.errors import HTTPError, error_response
from router.pool import Pool
from router.progress import ModelEvents
from router.proxy import OpenAIRoute
from router.pulls import Pulls
from router.streams_api import Streams

log = logging.getLogger("modelherd.app")

_STATUS_KIND = {401: ErrorKind.AUTHENTICATION, 404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}


def build_app(settings: Settings, pool: Pool, bridge: Bridge, events: ModelEvents) -> Starlette:
    server = settings.server

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bridge.start()
        pool.start()
        yield
        await pulls.close()
        log.info("stopping %d worker(s)", sum(1 for s in pool.slots() if s.worker is not None))
        await pool.close()

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    pulls = Pulls(events)
    streams = Streams(pool, bridge, Tracker(server.max_conversations, server.stream_retention),
                      server.stream_fanout_timeout)

    def proxied(endpoint: Endpoint) -> OpenAIRoute:
        return OpenAIRoute(endpoint, pool, bridge, streams, server.max_body_bytes, server.autoload)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", proxied(Endpoint.CHAT), methods=["POST"]),
        Route("/v1/completions", proxied(Endpoint.COMPLETION), methods=["POST"]),
        Route("/v1/embeddings", proxied(Endpoint.EMBEDDING), methods=["POST"]),
        *models_api.routes(pool),
        Route("/models/sse", models_api.event_feed(events, server.sse_keepalive), methods=["GET"]),
        *downloads_api.routes(pool, pulls, events, settings.cache_dir),
        *streams.routes(),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _STATUS_KIND.get(exc.status_code, ErrorKind.INVALID_REQUEST)
        response = error_response(kind, f"{request.method} {request.url.path}: {exc.detail}",
                                  status=exc.status_code)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    async def our_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_response(exc.kind, exc.message, exc.param, retry_after=exc.retry_after)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ErrorKind.INTERNAL, "internal server error")

    return Starlette(
        routes=routes,
        middleware=[Middleware(APIKeyMiddleware, keys=server.api_keys)],
        exception_handlers={HTTPException: http_error, HTTPError: our_error, Exception: server_error},
        lifespan=lifespan,
    )
