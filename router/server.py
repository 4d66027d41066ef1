"""The process: bind the listening sockets, run the app on uvicorn, turn signals into a drain.

uvicorn runs through its public API (`Config`, `Server.serve(sockets)`); the sockets
are bound here first, so a taken port fails before anything starts and several
addresses can be served. The ASGI lifespan enters the `Runtime`; once it is up, the
daemon's own SIGTERM/SIGINT handlers replace uvicorn's (they only count the signal:
the runtime's shutdown task drains, then asks uvicorn to exit). A daemon that drained
cleanly exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette

from router.app import build_app
from router.catalog import Catalog
from router.config import Settings
from router.runtime import Runtime

log = logging.getLogger("modelherd")


def bind(hosts: list[str], port: int) -> list[socket.socket]:
    """Listening sockets for every host; port 0 picks one free port, shared by them all."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            for family, kind, proto, _, address in socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                port = port or sock.getsockname()[1]
                sock.listen(2048)
                sock.setblocking(False)
                break  # the first address of each host
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def serve(settings: Settings, catalog: Catalog) -> int:
    try:
        import uvloop
    except ImportError:  # optional: the stdlib loop works, a little slower per token
        return asyncio.run(_serve(settings, catalog))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, catalog))


async def _serve(settings: Settings, catalog: Catalog) -> int:
    # Printed, not logged: where it looked must show whatever the log level.
    for directory in settings.models_dirs:
        if settings.default_models_dir:
            directory.mkdir(parents=True, exist_ok=True)
        state = "" if directory.is_dir() else " (does not exist)"
        print(f"modelherd: models dir: {directory}{state}", file=sys.stderr, flush=True)
    names = ", ".join(e.name for e in catalog) or "none"
    print(f"modelherd: {len(catalog)} model(s) available: {names}", file=sys.stderr, flush=True)

    server_settings = settings.server
    try:
        sockets = bind(server_settings.hosts, server_settings.port)
    except OSError as exc:
        print(f"modelherd: cannot listen on {', '.join(server_settings.hosts)} port "
              f"{server_settings.port}: {exc.strerror}", file=sys.stderr, flush=True)
        return 1
    runtime = Runtime(settings, catalog)
    server: uvicorn.Server | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, runtime.signal)
            runtime.watch_signals(stop_serving)
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                log.info("listening on http://%s:%d", shown, port)
            yield

    def stop_serving() -> None:
        assert server is not None
        server.should_exit = True

    app = build_app(settings, runtime, lifespan)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=server_settings.log_level, lifespan="on",
        # The drain already waited for requests in flight; this is for stragglers.
        timeout_graceful_shutdown=1, access_log=server_settings.log_level == "debug",
        server_header=False,
    ))
    try:
        await server.serve(sockets)
    finally:
        await runtime.close()  # a no-op after a clean lifespan shutdown
        for sock in sockets:
            sock.close()
    return 0
