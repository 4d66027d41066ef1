"""Process-level wiring: runtime dir, zmq context, catalog, pool, uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import uvicorn
import zmq

from router.app import build_app
from router.bridge import Bridge
from router.catalog import Catalog
from router.config import Settings
from router.pool import Pool

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
    """uvicorn re-raises a caught SIGTERM after shutdown, so the process would die by
    signal; a daemon that drained cleanly should exit 0. Our handlers only set
    uvicorn's flags: the first asks for a graceful stop, a second forces it."""

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
        pool = Pool(catalog, bridge, server.log_level, server.load_timeout, server.stop_timeout)
        app = build_app(settings, pool, bridge)
        config = uvicorn.Config(
            app, host=server.host, port=server.port, log_level=server.log_level,
            lifespan="on", timeout_graceful_shutdown=max(1, math.ceil(server.stop_timeout)),
            access_log=server.log_level == "debug", server_header=False,
        )
        await _Server(config).serve()
        return 0
    finally:
        ctx.destroy(linger=0)
        shutil.rmtree(runtime, ignore_errors=True)
