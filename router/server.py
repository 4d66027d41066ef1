"""The process: bind the listening sockets, run the app on uvicorn, turn signals into a drain.

uvicorn runs through its public API (`Config`, `Server.serve(sockets)`); the sockets
are bound here first, so a taken port fails before anything starts and several
addresses can be served. The ASGI lifespan enters the `Runtime`; once it is up, the
daemon's own SIGTERM/SIGINT handlers replace uvicorn's (they only count the signal:
the runtime's shutdown task drains, then asks uvicorn to exit). A daemon that drained
cleanly exits 0. Once uvicorn accepts connections, systemd hears READY=1 (router.notify);
uvicorn logs through the daemon's one logging config (router.logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette

from router.app import build_app
from router.catalog import Catalog
from router.config import Settings
from router.httpguard import Limits, guarded_protocol, raise_fd_limit
from router.logs import config as log_config
from router.logs import log_access
from router.notify import Notifier
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


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it accepts connections (systemd's READY=1 waits for it)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_started()


async def _serve(settings: Settings, catalog: Catalog) -> int:
    # At info, the default level: where it looked, and what it found.
    for directory in settings.models_dirs:
        if settings.default_models_dir:
            directory.mkdir(parents=True, exist_ok=True)
        state = "" if directory.is_dir() else " (does not exist)"
        log.info("models dir: %s%s", directory, state)
    names = ", ".join(e.name for e in catalog) or "none"
    log.info("%d model(s) available: %s", len(catalog), names)

    server_settings = settings.server
    try:
        sockets = bind(server_settings.hosts, server_settings.port)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", ", ".join(server_settings.hosts),
                  server_settings.port, exc.strerror)
        return 1
    warning = raise_fd_limit(server_settings.max_connections)
    if warning:
        log.warning("%s", warning)
    runtime = Runtime(settings, catalog, Notifier())
    runtime.request_observers.append(log_access)  # the access log: one line per request
    server: uvicorn.Server | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, runtime.signal)
            loop.add_signal_handler(signal.SIGHUP, runtime.hangup)
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
    limits = Limits(server_settings.max_header_bytes, server_settings.header_timeout,
                    server_settings.max_connections)
    server = _Server(uvicorn.Config(
        app, log_level=server_settings.log_level, lifespan="on",
        # The drain already waited for requests in flight; this is for stragglers.
        timeout_graceful_shutdown=1,
        # One logging setup for uvicorn's lines and ours (router.logs); requests are logged by
        # the access-log observer, with the model, tokens and key name uvicorn does not know.
        log_config=log_config(server_settings.log_level), access_log=False,
        server_header=False,
        # httptools with bounds on request heads and connections (router.httpguard); no route
        # is a WebSocket, and an upgraded connection would leave the guard's bookkeeping.
        http=guarded_protocol(limits), ws="none",
    ), runtime.announce_ready)
    try:
        await server.serve(sockets)
    finally:
        await runtime.close()  # a no-op after a clean lifespan shutdown
        for sock in sockets:
            sock.close()
    return 0
