"""One worker process: spawn, handshake, log capture, death detection, stop ladder.

Death is noticed through the process sentinel (an fd that becomes readable when
the process ends), never by a timeout. Stopping climbs a ladder: a Shutdown
message, a grace period, SIGTERM to the worker's process group, SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import uuid
from collections.abc import Callable

import multiprocess
from multiprocess.connection import Connection
from multiprocess.process import BaseProcess

from protocol import loglines
from protocol.codec import VersionMismatch, check_hello
from protocol.errors import ErrorKind
from protocol.messages import (
    Configure,
    DownloadProgress,
    Heartbeat,
    Hello,
    LoadFailed,
    LoadProgress,
    ModelInfo,
    Ready,
    Shutdown,
    StreamSettings,
    Upstream,
    WorkerConfig,
    WorkerStatus,
)
from router.bridge import Bridge, PeerUnreachable
from router.launch import run_worker

log = logging.getLogger("modelherd.supervisor")

LOG_TAIL_LINES = 40
TERM_GRACE_S = 3.0
LOAD_FAILED_GRACE_S = 2.0


class WorkerStartError(Exception):
    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class WorkerProcess:
    def __init__(self, config: WorkerConfig, bridge: Bridge, log_level: str,
                 on_progress: Callable[[LoadProgress | DownloadProgress], None],
                 on_exit: Callable[[WorkerProcess], None],
                 streams: StreamSettings | None = None) -> None:
        self.config = config
        self.streams = streams or StreamSettings()
        self.identity = f"{config.name}/{uuid.uuid4().hex[:8]}".encode()
        self.info: ModelInfo | None = None
        self.status: WorkerStatus | None = None  # the last one its heartbeat answers carried
        self.last_seen = 0.0  # loop time of its last message: a hung worker's stops moving
        self.exit_code: int | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._bridge = bridge
        self._log_level = log_level
        self._on_progress = on_progress
        self._on_exit = on_exit
        self._proc: BaseProcess | None = None
        self._lifeline: Connection | None = None
        self._log_conn: Connection | None = None
        self._log_buf = b""
        self._hello: asyncio.Future[Hello] | None = None
        self._ready: asyncio.Future[ModelInfo] | None = None
        self._deadline: asyncio.Timeout | None = None  # of the load, while it runs
        self._load_timeout = 0.0
        self._exited = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._spawning: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def start(self, load_timeout: float) -> ModelInfo:
        """Spawn, handshake and load; raises WorkerStartError with the reason."""
        self._load_timeout = load_timeout
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._ready = loop.create_future()
        ctx = multiprocess.get_context("spawn")
        life_r, life_w = ctx.Pipe(duplex=False)
        log_r, log_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=run_worker,
            args=(self._bridge.endpoint, self.identity.decode(), life_r, log_w, self._log_level),
            name=f"modelherd-worker:{self.config.name}",
            daemon=False,
        )
        self._bridge.add_peer(self.identity, self._on_message)
        # Spawning runs to the end even if this load is cancelled meanwhile: a child whose
        # sentinel is not watched would never be reaped (a zombie, and no exit event).
        self._spawning = asyncio.create_task(self._spawn(life_r, life_w, log_r, log_w),
                                             name=f"spawn:{self.config.name}")
        await asyncio.shield(self._spawning)
        try:
            # A download counts only while it stalls: each progress report moves the
            # deadline (a large model on a slow link may take longer than a load may).
            async with asyncio.timeout(load_timeout) as self._deadline:
                return await self._handshake()
        except TimeoutError:
            await self.stop(grace=0)
            raise WorkerStartError(f"worker did not become ready within {load_timeout:.0f} s "
                                   "(or its download stalled that long)") from None
        except WorkerStartError:
            # After LoadFailed the worker exits by itself: its own exit code says more
            # than the SIGTERM's would. (It may have closed its socket already, so no
            # Shutdown can reach it: wait for the exit itself.)
            await self._wait_exit(LOAD_FAILED_GRACE_S)
            await self.stop(grace=0)
            raise

    async def _spawn(self, life_r: Connection, life_w: Connection, log_r: Connection,
                     log_w: Connection) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._proc.start)
        except OSError as exc:  # fork/exec refused: out of processes or memory
            self._bridge.remove_peer(self.identity)
            raise WorkerStartError(f"could not start a worker process: {exc}") from exc
        finally:
            # The child has its copies now; ours of its ends must close so EOF works both ways.
            life_r.close()
            log_w.close()
        self._lifeline, self._log_conn = life_w, log_r
        os.set_blocking(log_r.fileno(), False)
        loop.add_reader(log_r.fileno(), self._pump_log)
        loop.add_reader(self._proc.sentinel, self._reap)

    async def _handshake(self) -> ModelInfo:
        assert self._hello is not None and self._ready is not None
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            for fut in (self._hello, self._ready):
                done, _ = await asyncio.wait({fut, exited}, return_when=asyncio.FIRST_COMPLETED)
                if fut not in done:
                    raise WorkerStartError(self._death_message("while starting"), self.exit_code)
                if fut is self._hello:
                    try:
                        check_hello(fut.result())  # type: ignore[arg-type]
                    except VersionMismatch as exc:
                        raise WorkerStartError(str(exc)) from exc
                    self._bridge.send(self.identity, Configure(self.config, self.streams))
            self.info = self._ready.result()
            return self.info
        except PeerUnreachable as exc:
            raise WorkerStartError(str(exc)) from exc
        finally:
            exited.cancel()

    def heartbeat(self, seq: int) -> None:
        """Ask the worker's socket thread for a sign of life (answered off the generation
        thread, so a long decode does not look like a hang)."""
        self._bridge.tell(self.identity, Heartbeat(seq))

    def _on_message(self, msg: Upstream) -> None:
        self.last_seen = asyncio.get_running_loop().time()
        if isinstance(msg, WorkerStatus):
            self.status = msg
        elif isinstance(msg, Hello) and self._hello and not self._hello.done():
            self._hello.set_result(msg)
        elif isinstance(msg, LoadProgress | DownloadProgress):
            if isinstance(msg, DownloadProgress) and self._deadline is not None and self._load_timeout:
                self._deadline.reschedule(asyncio.get_running_loop().time() + self._load_timeout)
            self._on_progress(msg)
        elif isinstance(msg, Ready) and self._ready and not self._ready.done():
            self._ready.set_result(msg.info)
        elif isinstance(msg, LoadFailed) and self._ready and not self._ready.done():
            self._ready.set_exception(WorkerStartError(msg.message))

    # ---- output and death ----------------------------------------------------

    def _pump_log(self) -> None:
        assert self._log_conn is not None
        try:
            data = os.read(self._log_conn.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_log()
            return
        *lines, self._log_buf = (self._log_buf + data).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._relay(line)

    def _relay(self, line: str) -> None:
        """Log a worker's line again, as `[model] message`, under the logger and at the level
        the worker used (protocol.loglines); other output (a print, C code writing to fd 2)
        at info."""
        level, name, message = loglines.parse(line)
        if not message.strip():
            return
        self.log_tail.append(message)
        logging.getLogger(name or "modelherd.worker").log(
            logging.INFO if level is None else level, "[%s] %s", self.config.name, message)

    def _close_log(self) -> None:
        if self._log_conn is None:
            return
        asyncio.get_running_loop().remove_reader(self._log_conn.fileno())
        if self._log_buf.strip():
            self._relay(self._log_buf.decode("utf-8", errors="replace").rstrip())
        self._log_conn.close()
        self._log_conn = None

    def _reap(self) -> None:
        assert self._proc is not None
        asyncio.get_running_loop().remove_reader(self._proc.sentinel)
        # The sentinel fires when the child closes it, a moment before the kernel
        # makes the exit status reapable: wait for that off the event loop.
        self._reaper = asyncio.create_task(self._finish_reap(), name=f"reap:{self.config.name}")

    async def _finish_reap(self) -> None:
        assert self._proc is not None
        await asyncio.to_thread(self._proc.join)
        self.exit_code = self._proc.exitcode
        # Drain what the worker wrote before dying: its last lines explain the death.
        while self._log_conn is not None:
            before = len(self.log_tail)
            self._pump_log()
            if self._log_conn is not None and len(self.log_tail) == before:
                self._close_log()
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self._bridge.remove_peer(self.identity)
        self._exited.set()
        aborted = self._bridge.fail_streams(self.identity, *self.gone_error())
        log.log(logging.INFO if self._stopping else logging.ERROR,
                "worker %s (pid %s) exited: %s%s", self.config.name, self._proc.pid, self.describe_exit(),
                f"; {aborted} request(s) aborted" if aborted else "")
        self._on_exit(self)

    def gone_error(self) -> tuple[ErrorKind, str]:
        """How a request this worker can no longer answer is answered: after an unload the
        client may simply retry (503); anything else is the worker's failure (502)."""
        name = self.config.name
        if self._stopping:
            return ErrorKind.UNAVAILABLE, f"model {name!r} was unloaded; retry"
        if self.exit_code is None:
            return ErrorKind.WORKER_FAILED, f"the worker serving {name!r} is not reachable"
        return ErrorKind.WORKER_FAILED, f"the worker serving {name!r} exited ({self.describe_exit()})"

    def describe_exit(self) -> str:
        code = self.exit_code
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _death_message(self, when: str) -> str:
        tail = " | ".join(list(self.log_tail)[-5:])
        return f"worker for {self.config.name} died {when} ({self.describe_exit()})" + (
            f"; last output: {tail}" if tail else "")

    # ---- stopping -----------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Shutdown message, wait `grace`, SIGTERM the group, wait, SIGKILL."""
        if self._spawning is not None:
            await asyncio.gather(self._spawning, return_exceptions=True)  # then the sentinel is watched
        if self._proc is None or self._exited.is_set() or self._proc.pid is None:
            return
        self._stopping = True
        try:
            self._bridge.send(self.identity, Shutdown("unload"))
        except PeerUnreachable:
            pass  # not connected yet (still starting): go straight to signals
        else:
            log.info("worker %s: asked to stop; %g s to finish its requests", self.config.name, grace)
            if await self._wait_exit(grace):
                return
        for sig, wait in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
            log.warning("worker %s: sending %s", self.config.name, sig.name)
            self._signal_group(sig)
            if sig is signal.SIGTERM:
                self._signal_group(signal.SIGCONT)  # a stopped (SIGSTOP) worker must run to die
            if await self._wait_exit(wait):
                return
        log.error("worker %s (pid %s) survived SIGKILL", self.config.name, self.pid)

    async def _wait_exit(self, within: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), within)
        except TimeoutError:
            return False
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            os.killpg(pid, sig)  # the worker called setsid(): its pid is its group id
            return
        except (ProcessLookupError, PermissionError):
            pass  # not a group leader yet (stopped before it reached setsid): signal it alone
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
