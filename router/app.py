"""The Starlette application: the route table, middleware and error rendering.

Every route reaches the daemon's state through the `Runtime` it is given; the ASGI
lifespan (passed in by router.server) starts and stops that runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from protocol.errors import ErrorKind
from protocol.messages import Endpoint
from router import downloads_api, models_api
from router.asgi import json_response
from router.auth import APIKeyMiddleware
from router.config import Settings
from router.errors import HTTPError, error_response
from router.proxy import ProxiedRoute
from router.runtime import Runtime
from router.schema import Health
from router.streams_api import Streams

log = logging.getLogger("modelherd.app")

_STATUS_KIND = {401: ErrorKind.AUTHENTICATION, 404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


def build_app(settings: Settings, runtime: Runtime, lifespan: Lifespan | None = None) -> Starlette:
    server = settings.server
    pool = runtime.pool
    streams = Streams(runtime.bridge, runtime.tracker, server.stream_fanout_timeout)

    async def health(request: Request) -> Response:
        return json_response(Health())

    def proxied(endpoint: Endpoint) -> ProxiedRoute:
        return ProxiedRoute(endpoint, pool, runtime.bridge, runtime.tracker, server.max_body_bytes,
                            server.autoload)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", proxied(Endpoint.CHAT), methods=["POST"]),
        Route("/v1/completions", proxied(Endpoint.COMPLETION), methods=["POST"]),
        Route("/v1/embeddings", proxied(Endpoint.EMBEDDING), methods=["POST"]),
        *models_api.routes(pool),
        Route("/models/sse", models_api.event_feed(runtime.events, server.sse_keepalive), methods=["GET"]),
        *downloads_api.routes(pool, runtime.pulls, runtime.events, settings.cache_dir),
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

