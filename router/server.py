"""Process-level wiring: runtime dir, zmq context, catalog, pool, uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import psutil
import uvicorn
import zmq

from protocol.errors import ErrorKind
from protocol.messages import StreamSettings
from router.admission import MIB
from router.app import build_app
from router.bridge import Bridge
from router.catalog import Catalog, ModelEntry
from router.config import Settings
from router.footprint import SystemMemory, estimate
from router.pool import Pool
from router.progress import ModelEvents
from router.slots import PoolSettings, ProgressFn, WorkerHandle
from router.supervisor import WorkerProcess

log = logging.getLogger("modelherd")


def runtime_base(env: dict[str, str] | None = None) -> Path:
    """systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR, else the temp dir."""
    env = dict(os.environ) if env is None else env
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = env.get(var)
        if value and Path(value.split(":")[0]).is_dir():
            return Path(value.split(":")[0])
    return Path(tempfile.gettempdir())


IPC_BASE_MAX = 80  # leaves room for "/modelherd-XXXXXXXX/router.sock"


class _Server(uvicorn.Server):
    """Drains before it stops. The first SIGTERM/SIGINT starts a drain: the port stays
    open and new requests get a 503 while those in flight finish, up to stop_timeout;
    then uvicorn shuts down and the workers are stopped. A second signal cuts the drain
    and the workers' grace short. The handlers only set flags; `on_tick` (uvicorn's
    100 ms loop) acts on them.

    uvicorn would re-raise a caught SIGTERM after shutdown, so the process would die by
    signal; a daemon that drained cleanly exits 0 instead."""

    def __init__(self, config: uvicorn.Config, pool: Pool, bridge: Bridge, events: ModelEvents,
                 drain_timeout: float) -> None:
        super().__init__(config)
        self._pool = pool
        self._bridge = bridge
        self._events = events
        self._drain_timeout = drain_timeout
        self._signals = 0
        self._drain_deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # on_tick acts on the count while uvicorn runs; once it is shutting down,
            # workers may still be in their grace period: this flag ends it.
            self._pool.cut.set()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter) or await self._drained():
            # Feed subscribers never finish on their own: end their streams so uvicorn
            # does not wait on them.
            self._events.close()
            return True
        return False

    async def _drained(self) -> bool:
        if not self._signals:
            return False
        now = time.monotonic()
        if self._drain_deadline is None:
            self._pool.begin_drain(self._drain_timeout)
            self._drain_deadline = now + self._drain_timeout
            log.info("draining: refusing new requests, waiting up to %g s for those in flight",
                     self._drain_timeout)
        if self._pool.idle:
            log.info("drained: no request in flight")
            return True
        if self._signals > 1:
            log.warning("second signal: stopping now, with requests still in flight")
        elif now >= self._drain_deadline:
            log.warning("drain timeout: stopping with requests still in flight")
        else:
            return False
        # What is still running ends with an error the client can read, not a cut connection.
        self._pool.cut_drain()
        self._bridge.fail_streams(None, ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry")
        return True


def clean_stale_runtime_dirs(base: Path) -> list[Path]:
    """Remove runtime dirs left by a router that was killed (-9) before it could clean up."""
    removed = []
    for d in base.glob("modelherd-*"):
        pid_file = d / "router.pid"
        try:
            if d.stat().st_uid != os.getuid() or not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid and not psutil.pid_exists(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


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

    base = runtime_base()
    if len(str(base)) > IPC_BASE_MAX:  # ipc:// paths are capped at ~107 bytes by the kernel
        base = Path("/tmp")
    for stale in clean_stale_runtime_dirs(base):
        log.info("removed stale runtime dir %s", stale)
    # mkdtemp creates the directory with mode 0700: only our user reaches the sockets.
    runtime = Path(tempfile.mkdtemp(prefix="modelherd-", dir=base))
    (runtime / "router.pid").write_text(str(os.getpid()))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        bridge = Bridge(ctx, f"ipc://{runtime}/router.sock")
        server = settings.server
        streams = StreamSettings(server.stream_buffer_bytes, server.stream_retention,
                                 server.max_conversations, server.stream_memory_mb * MIB)

        def launch(entry: ModelEntry, on_progress: ProgressFn,
                   on_exit: Callable[[WorkerHandle], None]) -> WorkerHandle:
            return WorkerProcess(entry.worker, bridge, server.log_level, on_progress, on_exit, streams)

        pool = Pool(catalog, PoolSettings(
            max_models=server.max_models, max_waiting=server.max_waiting,
            memory_margin=server.memory_margin_mb * MIB, load_timeout=server.load_timeout,
            stop_timeout=server.stop_timeout), launch, SystemMemory(), estimate)
        events = ModelEvents(pool.slots)
        for slot in pool.slots():
            slot.watcher = events.watch
        app = build_app(settings, pool, bridge, events)
        config = uvicorn.Config(
            app, host=server.host, port=server.port, log_level=server.log_level,
            # The drain already waited for requests in flight; this is for stragglers.
            lifespan="on", timeout_graceful_shutdown=1,
            access_log=server.log_level == "debug", server_header=False,
        )
        uv = _Server(config, pool, bridge, events, server.stop_timeout)
        try:
            await uv.serve()
        finally:
            # After a forced exit uvicorn skips the lifespan shutdown: stop the workers here.
            await pool.close(grace=0)
            await bridge.close()
        return 0
    finally:
        ctx.destroy(linger=0)
        shutil.rmtree(runtime, ignore_errors=True)
