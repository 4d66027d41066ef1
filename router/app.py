"""The Starlette application: the route table, middleware and error rendering.

Every route reaches the daemon's state through the `Runtime` it is given; the ASGI
lifespan (passed in by router.server) starts and stops that runtime. The proxied routes
are those of OpenAI (with and without `/v1`, as llama-server serves them), the Responses
API, Anthropic's Messages API and llama-server's own (/completion, /infill, /tokenize...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from protocol.errors import Dialect, ErrorKind
from protocol.messages import Endpoint
from router import downloads_api, metrics, models_api, responses_api, statuspage
from router.asgi import RawEndpoint, json_response
from router.auth import APIKeyMiddleware
from router.config import Settings
from router.cors import CORSMiddleware
from router.errors import HTTPError, error_response
from router.proxy import ProxiedRoute, RouteSpec
from router.requestlog import RequestLogMiddleware
from router.runtime import Runtime
from router.schema import FeatureDisabled, Health, RouterProps
from router.streams_api import Streams

log = logging.getLogger("modelherd.app")

_STATUS_KIND = {401: ErrorKind.AUTHENTICATION, 404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]

ANTHROPIC = Dialect.ANTHROPIC
# (paths, what the worker is asked, whose error shape, model in the query string)
PROXIED: list[tuple[tuple[str, ...], RouteSpec]] = [
    (("/v1/chat/completions", "/chat/completions"), RouteSpec(Endpoint.CHAT)),
    (("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens"),
     RouteSpec(Endpoint.CHAT_INPUT_TOKENS)),
    (("/v1/completions",), RouteSpec(Endpoint.COMPLETION)),
    (("/completion", "/completions"), RouteSpec(Endpoint.NATIVE_COMPLETION)),  # llama-server's native
    (("/infill",), RouteSpec(Endpoint.INFILL)),
    (("/v1/embeddings",), RouteSpec(Endpoint.EMBEDDING)),
    (("/embedding", "/embeddings"), RouteSpec(Endpoint.NATIVE_EMBEDDING)),
    (("/v1/responses", "/responses"), RouteSpec(Endpoint.RESPONSES)),
    (("/v1/responses/input_tokens", "/responses/input_tokens"), RouteSpec(Endpoint.RESPONSES_INPUT_TOKENS)),
    (("/v1/messages",), RouteSpec(Endpoint.MESSAGES, ANTHROPIC)),
    (("/v1/messages/count_tokens",), RouteSpec(Endpoint.MESSAGES_COUNT_TOKENS, ANTHROPIC)),
    (("/tokenize",), RouteSpec(Endpoint.TOKENIZE)),
    (("/detokenize",), RouteSpec(Endpoint.DETOKENIZE)),
    (("/apply-template",), RouteSpec(Endpoint.APPLY_TEMPLATE)),
]


def build_app(settings: Settings, runtime: Runtime, lifespan: Lifespan | None = None) -> Starlette:
    server = settings.server
    pool = runtime.pool
    streams = Streams(runtime.bridge, runtime.tracker, server.stream_fanout_timeout,
                      server.stream_window_bytes)

    def default_model() -> str | None:
        if server.default_model:
            return server.default_model
        names = [v.name for v in pool.views()]
        return names[0] if len(names) == 1 else None

    def proxied(spec: RouteSpec) -> ProxiedRoute:
        return ProxiedRoute(spec, pool, runtime.bridge, runtime.tracker, runtime.responses,
                            server.max_body_bytes, server.autoload, default_model,
                            server.stream_window_bytes)

    async def health(request: Request) -> Response:
        return json_response(Health())

    async def no_tools(request: Request) -> Response:
        """llama-server's answer when its built-in tools or its web UI's CORS proxy are off:
        its web UI reads a 403 as "disabled" and anything else as a failure to report.
        modelherd has neither: the proxy would fetch any URL for anyone with a key."""
        return json_response(FeatureDisabled(), status=403)

    props_of_model = proxied(RouteSpec(Endpoint.PROPS, model_in_query=True))

    async def props(scope: Scope, receive: Receive, send: Send) -> None:
        """With ?model=, that model's own /props (from its worker); without, the router's."""
        if b"model=" in scope["query_string"]:
            await props_of_model(scope, receive, send)
            return
        body = RouterProps(server.max_models, server.autoload, "modelherd")
        await json_response(body)(scope, receive, send)

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/props", RawEndpoint(props), methods=["GET"]),
        Route("/tools", no_tools, methods=["GET", "POST"]),
        Route("/cors-proxy", no_tools, methods=["GET", "POST"]),
        Route("/slots", proxied(RouteSpec(Endpoint.SLOTS, model_in_query=True)), methods=["GET"]),
        *[Route(path, proxied(spec), methods=["POST"]) for paths, spec in PROXIED for path in paths],
        *models_api.routes(pool, runtime.reload),
        Route("/models/sse", models_api.event_feed(runtime.events, server.sse_keepalive), methods=["GET"]),
        *downloads_api.routes(pool, runtime.pulls, runtime.events, settings.cache_dir),
        *responses_api.routes(runtime.responses),
        *streams.routes(),
        Route("/metrics", metrics.endpoint(runtime.metrics), methods=["GET"]),
    ]
    # The status page: at / unless a web app has it; at /status either way.
    page_routes, page_public = statuspage.routes(runtime.keys, at_root=not server.ui_dir)
    routes += page_routes
    public: set[str] = set(page_public) | ({"/metrics"} if server.metrics_public else set())
    if server.ui_dir:  # last: every route above wins over a file of the same name
        ui = Path(server.ui_dir)
        routes.append(Mount("/", StaticFiles(directory=ui, html=True), name="ui"))
        public |= {"/", "/_app/"} | {f"/{p.relative_to(ui)}" for p in ui.glob("*") if p.is_file()}

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
        middleware=[Middleware(RequestLogMiddleware, observers=runtime.request_observers),
                    Middleware(CORSMiddleware, origins=server.cors_origins),
                    Middleware(APIKeyMiddleware, keys=runtime.keys, public=frozenset(public))],
        exception_handlers={HTTPException: http_error, HTTPError: our_error, Exception: server_error},
        lifespan=lifespan,
    )
