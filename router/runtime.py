"""Who starts and stops everything: the daemon's one owner of background resources.

`async with Runtime(settings, catalog)` makes the runtime dir (mode 0700, where the
worker sockets live), the ZeroMQ context and bridge, the pool and its scheduler, the
pulls, the conversation tracker and the event feed, and starts them in that order;
leaving it stops them in the reverse order, every worker by the ladder. The ASGI
lifespan enters it. A drain (the first SIGTERM) refuses new requests while those in
flight finish, up to `stop_timeout`; a second signal, or the end of that grace, ends
what still runs with an error the client can read. What systemd hears (READY, RELOADING,
STOPPING, STATUS, WATCHDOG: router.notify) is sent from here, as these things happen.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import zmq

from protocol.errors import ErrorKind
from protocol.messages import StreamSettings
from router.admission import MIB
from router.bridge import Bridge
from router.catalog import Catalog, ModelEntry, build_catalog
from router.config import ConfigError, Settings, build_settings
from router.convs import Tracker
from router.footprint import SystemMemory, estimate
from router.keys import Keys
from router.metrics import Metrics
from router.modelstate import ModelStatus
from router.notify import Announcer, Notifier
from router.pool import ModelView, Pool, ProgressFn, WorkerHandle
from router.progress import ModelEvents
from router.pulls import Pulls
from router.requestlog import Observer
from router.responses_store import ResponseStore
from router.scheduler import SchedulerSettings
from router.supervisor import WorkerProcess
from router.version import version

log = logging.getLogger("modelherd")

IPC_BASE_MAX = 80  # leaves room for "/modelherd-XXXXXXXX/router.sock" under the ~107-byte cap


def runtime_base(env: dict[str, str] | None = None) -> Path:
    """systemd's RuntimeDirectory, else $XDG_RUNTIME_DIR, else the temp dir."""
    env = dict(os.environ) if env is None else env
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = env.get(var)
        if value and Path(value.split(":")[0]).is_dir():
            return Path(value.split(":")[0])
    return Path(tempfile.gettempdir())


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


class Runtime:
    def __init__(self, settings: Settings, catalog: Catalog, notifier: Notifier | None = None) -> None:
        server = settings.server
        self.settings = settings
        self.bridge = Bridge()
        self._wake = asyncio.Event()  # a signal, the pool going idle, or closing
        self.events: ModelEvents
        self.pool = Pool(catalog, SchedulerSettings(
            max_models=server.max_models, max_waiting=server.max_waiting,
            memory_margin=server.memory_margin_mb * MIB, stop_timeout=server.stop_timeout),
            self._launch, SystemMemory(), estimate, load_timeout=server.load_timeout,
            heartbeat=(server.heartbeat_interval, server.heartbeat_timeout),
            on_hung=self._hung,
            on_status=self._status_changed,
            on_progress=lambda view: self.events.load_progress(view), on_idle=self._wake.set)
        self.events = ModelEvents(self.pool.views)
        self.metrics = Metrics(self.pool.views, self.pool.resolve, version())
        self.pulls = Pulls(self.events)
        self.tracker = Tracker(server.max_conversations, server.stream_retention)
        self.keys = Keys(settings.keys)
        self.responses = ResponseStore(server.max_stored_responses, server.stored_responses_mb * MIB)
        self.request_observers: list[Observer] = []  # each sees every request's RequestFacts at its end
        self.request_observers.append(self.metrics.observe)
        # systemd's Type=notify (router.notify); without $NOTIFY_SOCKET it sends nothing.
        self.notifier = notifier if notifier is not None else Notifier({})
        self._announcer = Announcer(self.notifier, self.status_line)
        self._stopping_said = False
        self._reload_error = ""  # why the last reload failed; shown in STATUS= until one works
        self._streams = StreamSettings(server.stream_buffer_bytes, server.stream_retention,
                                       server.max_conversations, server.stream_memory_mb * MIB)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._dir: Path | None = None
        self._signals = 0
        self._hups = 0
        self._hup = asyncio.Event()
        self._reloader: asyncio.Task[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._drain_ends: float | None = None

    def _status_changed(self, view: ModelView) -> None:
        self.events.status(view)
        self.metrics.status(view)

    def _hung(self, worker: WorkerHandle, why: str) -> None:
        """A hung worker's requests end now, with a 503 (or an error event) saying why."""
        self.bridge.fail_streams(worker.identity, ErrorKind.UNAVAILABLE, why)

    def _launch(self, entry: ModelEntry, on_progress: ProgressFn,
                on_exit: Callable[[WorkerHandle], None]) -> WorkerHandle:
        return WorkerProcess(entry.worker, self.bridge, self.settings.server.log_level, on_progress, on_exit,
                             self._streams)

    # ---- start and stop, in one order ---------------------------------------------

    async def __aenter__(self) -> Runtime:
        base = runtime_base()
        if len(str(base)) > IPC_BASE_MAX:  # ipc:// paths are capped at ~107 bytes by the kernel
            base = Path("/tmp")
        for stale in clean_stale_runtime_dirs(base):
            log.info("removed stale runtime dir %s", stale)
        # mkdtemp creates the directory with mode 0700: only our user reaches the sockets.
        self._dir = Path(tempfile.mkdtemp(prefix="modelherd-", dir=base))
        (self._dir / "router.pid").write_text(str(os.getpid()))
        self._ctx = zmq.Context()
        self.bridge.start(self._ctx, f"ipc://{self._dir}/router.sock")
        self.pool.start()
        self._started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop everything, newest first; safe to call more than once."""
        if not self._started:
            return
        self._started = False
        self._say_stopping("stopping")
        self.events.close()
        await self.pulls.close()
        grace = self.settings.server.stop_timeout
        if self._drain_ends is not None:
            grace = max(0.0, self._drain_ends - asyncio.get_running_loop().time())
        live = sum(1 for v in self.pool.views() if v.worker is not None)
        if live:
            log.info("stopping %d worker(s)", live)
        await self.pool.close(grace)  # meanwhile a second signal still cuts the grace short
        self._closing = True
        self._wake.set()
        self._hup.set()
        for task in (self._shutdown, self._reloader):
            if task is not None:
                await task
        await self.bridge.close()
        await self._announcer.close()  # WATCHDOG=1 went on while the workers stopped
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # ---- what systemd is told (router.notify) ------------------------------------------

    def announce_ready(self) -> None:
        """The port answers: READY=1, then WATCHDOG=1 and STATUS= from their own tasks."""
        self._announcer.start()

    def status_line(self) -> str:
        """What `systemctl status` shows: models loaded, requests in flight and waiting."""
        models = self.pool.scheduler.models()
        loaded = sorted(m.name for m in models if m.status is ModelStatus.LOADED)
        serving = sum(len(m.serving) for m in models)
        waiting = sum(len(m.waiters) for m in models)
        text = f"{len(loaded)} model(s) loaded"
        if loaded:
            shown = ", ".join(loaded[:5]) + (f" and {len(loaded) - 5} more" if len(loaded) > 5 else "")
            text += f" ({shown})"
        text += f"; {serving} request(s) in flight, {waiting} waiting for a model"
        if self._stopping_said:
            text = f"stopping: {text}"
        if self._reload_error:
            text += f"; the last reload failed, still on the previous configuration: {self._reload_error}"
        return text

    def _say_stopping(self, status: str) -> None:
        if not self._stopping_said:
            self._stopping_said = True
            self.notifier.stopping(status)
            self._announcer.said(status)

    # ---- signals and the drain ---------------------------------------------------------

    def reload(self) -> list[str]:
        """Read the config file and the models dirs again and apply them: new models appear,
        removed ones are unloaded once idle (their streams finish first), changed ones are
        reloaded once idle, keys change at once. Listening addresses and the other [server]
        settings need a restart. Raises ConfigError (the running configuration stays).
        systemd hears RELOADING=1, then READY=1 either way: a failed reload still serves."""
        stopping = self._stopping_said  # a reload during the drain is no news to systemd
        if not stopping:
            self.notifier.reloading()
        try:
            names = self._apply_config()
        except Exception as exc:
            self._reload_error = str(exc)
            raise
        else:
            self._reload_error = ""
        finally:
            if not stopping:
                status = self.status_line()
                self.notifier.ready(status)
                self._announcer.said(status)
        return names

    def _apply_config(self) -> list[str]:
        settings = build_settings(self.settings.config_path, self.settings.overrides)
        catalog = build_catalog(settings)
        self.keys.replace(settings.keys)
        self.pool.update_catalog(catalog)
        self.settings = msgspec.structs.replace(settings, server=self.settings.server)
        names = [e.name for e in catalog]
        self.events.publish("*", "models_reload")
        log.info("configuration reloaded: %d model(s): %s", len(names), ", ".join(names) or "none")
        return names

    def hangup(self) -> None:
        """A SIGHUP arrived: only noted here (this runs as a signal handler); the reload task
        acts on it."""
        self._hups += 1
        self._hup.set()

    def signal(self) -> None:
        """A SIGTERM or SIGINT arrived: only counted here (this runs as a signal handler);
        the shutdown task acts on it."""
        self._signals += 1
        self._wake.set()

    def watch_signals(self, on_drained: Callable[[], None]) -> None:
        """Start the task that drains on the first signal, then calls `on_drained`, and the one
        that reloads on SIGHUP."""
        self._shutdown = asyncio.create_task(self._drain(on_drained), name="shutdown")
        self._reloader = asyncio.create_task(self._reload_on_hangup(), name="reload-on-sighup")

    async def _reload_on_hangup(self) -> None:
        seen = 0
        while not self._closing:
            if self._hups == seen:
                await self._hup.wait()
                self._hup.clear()
                continue
            seen = self._hups
            try:
                self.reload()
            except ConfigError as exc:
                log.error("reload failed; the running configuration stays: %s", exc)

    async def _wait(self, deadline: float | None = None) -> None:
        """Until a signal, the pool going idle, closing, or `deadline` (loop time)."""
        self._wake.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _drain(self, on_drained: Callable[[], None]) -> None:
        while not self._signals and not self._closing:
            await self._wait()
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        grace = self.settings.server.stop_timeout
        self._drain_ends = ends = loop.time() + grace
        self.pool.drain()
        self._say_stopping(f"draining: waiting up to {grace:g} s for the requests in flight")
        log.info("draining: refusing new requests, waiting up to %g s for those in flight", grace)
        while not self.pool.idle and self._signals == 1 and loop.time() < ends:
            await self._wait(ends)
        if self.pool.idle:
            log.info("drained: no request in flight")
        else:
            if self._signals > 1:
                log.warning("second signal: stopping now, with requests still in flight")
            else:
                log.warning("drain timeout: stopping with requests still in flight")
            self._cut()
        # Feed subscribers never finish on their own: end their streams so uvicorn does not wait.
        self.events.close()
        on_drained()
        seen = self._signals
        while not self._closing:  # a signal during the shutdown cuts the workers' grace short
            await self._wait()
            if self._signals > seen:
                seen = self._signals
                self._cut()

    def _cut(self) -> None:
        """No more grace: what still runs ends with an error the client can read."""
        self._drain_ends = asyncio.get_running_loop().time()
        self.pool.cut()
        self.bridge.fail_streams(None, ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry")
