"""The pool: carries out the scheduler's effects on real worker processes, and feeds the
scheduler what happens to them.

The scheduler (router.scheduler) decides; this module only acts: it starts a worker
for `StartLoad` (through the launcher: router.supervisor in the daemon, fakes in
tests), stops one for `Stop`, reads a model's memory estimate for `EstimateMemory`,
and hands a waiting request its worker (`Grant`) or its error (`Deny`) through the
callback the request gave. Outcomes (a load done or failed, a worker exited) go back
in as events. Every background task is owned here and named; none is cancelled to
pass a message: a load ends because its worker is stopped, a stop by the ladder.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.errors import ErrorKind
from protocol.messages import DownloadProgress, LoadProgress, ModelInfo, WorkerConfig, WorkerStatus
from router.admission import MIB, Estimate
from router.catalog import Catalog, ModelEntry
from router.effects import Deny, Effect, EstimateMemory, Grant, Log, StartLoad, Status, Stop
from router.modelstate import Failure, Model, ModelStatus
from router.scheduler import Scheduler, SchedulerSettings
from router.supervisor import WorkerStartError

log = logging.getLogger("modelherd.pool")


class PoolError(Exception):
    def __init__(self, kind: ErrorKind, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class WorkerHandle(Protocol):
    """What the pool needs of a worker process (router.supervisor.WorkerProcess)."""

    identity: bytes
    exit_code: int | None
    status: WorkerStatus | None
    last_seen: float

    @property
    def pid(self) -> int | None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def log_tail(self) -> Sequence[str]: ...
    async def start(self, load_timeout: float) -> ModelInfo: ...
    async def stop(self, grace: float) -> None: ...
    def heartbeat(self, seq: int) -> None: ...
    def gone_error(self) -> tuple[ErrorKind, str]: ...
    def describe_exit(self) -> str: ...


ProgressFn = Callable[[LoadProgress | DownloadProgress], None]
Launcher = Callable[[ModelEntry, ProgressFn, Callable[[WorkerHandle], None]], WorkerHandle]
# What a request is told: its worker, or why it gets none. Called once, maybe at once.
Notify = Callable[[WorkerHandle | PoolError], None]


class Memory(Protocol):
    def available(self) -> int: ...
    def rss(self, pid: int) -> int | None: ...


@dataclass
class Progress:
    """How far a model's current load has got, as its worker reported it."""

    gen: int = 0  # of the load it reports on
    stage: str = ""  # "download", or a load stage: e.g. "weights" (llama.cpp reports "load")
    value: float = 0.0
    download: DownloadProgress | None = None  # the last download report, while downloading

    def report(self, msg: LoadProgress | DownloadProgress) -> None:
        if isinstance(msg, DownloadProgress):
            self.download = msg
            self.stage = "" if msg.finished else "download"  # then it loads
            self.value = msg.downloaded / msg.total if msg.total else 0.0
        else:
            self.download = None
            self.stage, self.value = msg.stage, msg.value


@dataclass(frozen=True)
class ModelView:
    """One model as the routes and the event feed show it."""

    model: Model
    progress: Progress
    worker: WorkerHandle | None
    info: ModelInfo | None  # once loaded
    rss: int | None

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def entry(self) -> ModelEntry:
        return self.model.entry

    @property
    def status(self) -> ModelStatus:
        return self.model.status

    @property
    def public_status(self) -> str:
        """The status clients see: a load still fetching its files is "downloading"."""
        if self.model.status is ModelStatus.LOADING and self.progress.stage == "download":
            return "downloading"
        return self.model.status.value


class Pool:
    def __init__(self, catalog: Catalog, settings: SchedulerSettings, launcher: Launcher, memory: Memory,
                 estimator: Callable[[WorkerConfig], Estimate], *, load_timeout: float,
                 heartbeat: tuple[float, float] = (5.0, 30.0),
                 on_hung: Callable[[WorkerHandle, str], None] = lambda worker, why: None,
                 on_status: Callable[[ModelView], None] = lambda view: None,
                 on_progress: Callable[[ModelView], None] = lambda view: None,
                 on_idle: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.scheduler = Scheduler(catalog, settings, WorkerMemory(memory, self))
        self._launch = launcher
        self._memory = memory
        self._estimator = estimator
        self._load_timeout = load_timeout
        self._heartbeat_every, self._heartbeat_timeout = heartbeat
        self._on_hung = on_hung
        self._on_status = on_status
        self._on_progress = on_progress
        self._on_idle = on_idle
        self._clock = clock
        self._waiters = itertools.count(1)
        self._notify: dict[int, Notify] = {}
        self._workers: dict[tuple[str, int], WorkerHandle] = {}  # every live worker by (model, gen)
        self._exits: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._stopped: set[tuple[str, int]] = set()  # asked to stop: by the ladder, once
        self._info: dict[str, ModelInfo] = {}
        self._progress: dict[str, Progress] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._effects: list[Effect] = []
        self._applying = False
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()

    # ---- views -------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """The model's own name for a name or alias; None when no model has it."""
        entry = self.catalog.resolve(name)
        if entry is None or self.scheduler.model(entry.name) is None:
            return None
        return entry.name

    def view(self, name: str) -> ModelView | None:
        m = self.scheduler.model(name)
        if m is None:
            return None
        worker = self._workers.get((name, m.gen)) if m.gen else None
        pid = worker.pid if worker is not None else None
        return ModelView(m, self._load_progress(m), worker,
                         self._info.get(name) if m.status is ModelStatus.LOADED else None,
                         self._memory.rss(pid) if pid is not None else None)

    def _load_progress(self, m: Model) -> Progress:
        progress = self._progress.get(m.name)
        if progress is None or progress.gen != m.gen:  # nothing of an earlier load holds
            progress = self._progress[m.name] = Progress(m.gen)
        return progress

    def views(self) -> list[ModelView]:
        return [v for m in self.scheduler.models() if (v := self.view(m.name)) is not None]

    def worker(self, name: str) -> WorkerHandle | None:
        """The model's live worker, if it has one."""
        m = self.scheduler.model(name)
        return self._workers.get((name, m.gen)) if m is not None and m.gen else None

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    # ---- requests -----------------------------------------------------------------

    def request(self, name: str, notify: Notify, *, autoload: bool = True) -> int:
        """Ask for `name`'s worker; `notify` is called once with it or with the error,
        possibly before this returns. The number returned is the request's ticket."""
        model = self.resolve(name)
        if model is None:
            notify(PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found"))
            return 0
        ticket = next(self._waiters)
        self._notify[ticket] = notify
        self._feed(self.scheduler.request(ticket, model, self._clock(), autoload=autoload))
        return ticket

    def release(self, ticket: int) -> None:
        """The request is over (served, or it left the queue)."""
        self._notify.pop(ticket, None)
        self._feed(self.scheduler.release(ticket, self._clock()))

    async def load(self, name: str, wait: bool) -> None:
        """An operator's load: skips the failure backoff. With `wait`, returns once the
        model is loaded (or raises why not); without, once the load is under way."""
        model = self.resolve(name)
        if model is None:
            raise PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        outcome: asyncio.Future[WorkerHandle | PoolError] = asyncio.get_running_loop().create_future()
        ticket = next(self._waiters)

        def told(what: WorkerHandle | PoolError) -> None:
            if not outcome.done():
                outcome.set_result(what)
            if not isinstance(what, PoolError):
                self.release(ticket)  # nothing to serve: a load holds no place once done

        self._notify[ticket] = told
        self._feed(self.scheduler.load(ticket, model, self._clock()))
        if outcome.done() or wait:
            answer = await outcome
            if isinstance(answer, PoolError):
                raise answer

    async def unload(self, name: str) -> None:
        """Unload and return once its worker has exited."""
        model = self.resolve(name)
        if model is None:
            raise PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        m = self.scheduler.model(model)
        assert m is not None
        exit_of = self._exit_future(model, m.gen) if m.gen and m.started else None
        self._feed(self.scheduler.unload(model, self._clock()))
        if exit_of is not None:
            await asyncio.shield(exit_of)

    def update_catalog(self, catalog: Catalog) -> None:
        """A reload: new models appear, removed ones go once idle, changed ones reload once idle."""
        self.catalog = catalog
        self._feed(self.scheduler.update_catalog(list(catalog), self._clock()))

    # ---- the daemon's life ----------------------------------------------------------

    def start(self) -> None:
        """Start the timer (idle ttl, re-planning) and the load_on_startup models."""
        self._own(self._time(), "pool-timer")
        if self._heartbeat_every > 0:
            self._own(self._heartbeats(), "heartbeats")
        for m in self.scheduler.models():
            if m.entry.policy.load_on_startup:
                self._own(self._quiet_load(m.name), f"startup-load:{m.name}")

    async def _quiet_load(self, name: str) -> None:
        try:
            await self.load(name, wait=True)
        except PoolError as exc:
            log.error("load_on_startup model %s: %s", name, exc.message)

    def drain(self) -> None:
        self.scheduler.drain()

    def cut(self) -> None:
        """The drain is over: waiters are refused now, loads stopped, and every worker's
        grace ends (what is still running ends at once)."""
        self._feed(self.scheduler.cut())
        if self._workers:
            log.warning("stopping %d worker(s) without further grace", len(self._workers))
        for key, worker in list(self._workers.items()):
            self._stop(key, worker, 0.0)

    async def close(self, grace: float) -> None:
        """Stop every worker by the ladder, giving what runs `grace` seconds; returns once
        every worker has exited and every task of the pool has ended."""
        self._closing.set()
        self._feed(self.scheduler.close(grace))
        for key, worker in list(self._workers.items()):
            if key not in self._stopped:  # whatever a race left behind is stopped too
                self._stop(key, worker, 0.0)
        while self._tasks:  # the timer ends too: the scheduler is closed
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- carrying out effects -------------------------------------------------------

    def _feed(self, effects: list[Effect]) -> None:
        """Carry out `effects` in order. Effects of events fed while this runs (a callback
        releasing at once) queue behind, so the scheduler is never re-entered."""
        self._effects.extend(effects)
        if self._applying:
            return
        self._applying = True
        try:
            while self._effects:
                self._apply(self._effects.pop(0))
        finally:
            self._applying = False
        self._changed.set()
        if self.scheduler.idle:
            self._on_idle()

    def _apply(self, effect: Effect) -> None:
        if isinstance(effect, Grant):
            self._grant(effect)
        elif isinstance(effect, Deny):
            notify = self._notify.pop(effect.waiter, None)
            if notify is not None:
                why = effect.why
                notify(PoolError(why.kind, why.message, why.retry_after))
        elif isinstance(effect, Status):
            view = self.view(effect.model)
            if view is not None:
                self._on_status(view)
        elif isinstance(effect, Log):
            log.log(effect.level, "%s", effect.message)
        elif isinstance(effect, StartLoad):
            self._start_load(effect)
        elif isinstance(effect, Stop):
            worker = self._workers.get((effect.model, effect.gen))
            if worker is not None:
                self._stop((effect.model, effect.gen), worker, effect.grace)
        elif isinstance(effect, EstimateMemory):
            self._own(self._estimate(effect.model), f"estimate:{effect.model}")

    def _stop(self, key: tuple[str, int], worker: WorkerHandle, grace: float) -> None:
        self._stopped.add(key)
        self._own(worker.stop(grace), f"stop:{key[0]}")

    def _grant(self, grant: Grant) -> None:
        notify = self._notify.get(grant.waiter)
        if notify is None:
            return
        worker = self._workers.get((grant.model, grant.gen))
        if worker is None or not worker.alive:  # it ended between its load and this turn
            del self._notify[grant.waiter]
            error = worker.gone_error() if worker is not None else (
                ErrorKind.UNAVAILABLE, f"model {grant.model!r} was unloaded; retry")
            self._feed(self.scheduler.release(grant.waiter, self._clock()))
            notify(PoolError(*error))
            return
        notify(worker)

    def _start_load(self, effect: StartLoad) -> None:
        m = self.scheduler.model(effect.model)
        assert m is not None
        progress = self._load_progress(m)
        key = (effect.model, effect.gen)

        def on_progress(msg: LoadProgress | DownloadProgress) -> None:
            progress.report(msg)
            if self.scheduler.model(effect.model) is m and m.gen == effect.gen:
                view = self.view(effect.model)
                if view is not None:
                    self._on_progress(view)

        worker = self._launch(m.entry, on_progress, lambda w: self._exited(key, w))
        self._workers[key] = worker
        self._own(self._load(key, worker), f"load:{effect.model}")

    async def _load(self, key: tuple[str, int], worker: WorkerHandle) -> None:
        name, gen = key
        started = self._clock()
        try:
            info = await worker.start(self._load_timeout)
            if not worker.alive:  # it died between Ready and now: its exit was not ours to handle
                raise WorkerStartError(f"the worker exited right after loading ({worker.describe_exit()})")
        except WorkerStartError as exc:
            failure = Failure(exc.message, worker.exit_code, tuple(worker.log_tail))
            self._feed(self.scheduler.load_failed(name, gen, self._clock(), failure))
            return
        self._info[name] = info
        rss = self._memory.rss(worker.pid) if worker.pid is not None else None
        log.info("model %s loaded in %.2f s (pid %s, %d MiB)", name, self._clock() - started,
                 worker.pid, (rss or 0) // MIB)
        self._feed(self.scheduler.load_done(name, gen, self._clock(), rss or 0))

    def _exited(self, key: tuple[str, int], worker: WorkerHandle) -> None:
        self._workers.pop(key, None)
        self._stopped.discard(key)
        exit_of = self._exits.pop(key, None)
        if exit_of is not None and not exit_of.done():
            exit_of.set_result(None)
        failure = None
        if not worker.stopping:
            failure = Failure(f"worker exited unexpectedly ({worker.describe_exit()})",
                              worker.exit_code, tuple(worker.log_tail))
        self._feed(self.scheduler.worker_exited(key[0], key[1], self._clock(), failure))

    def _exit_future(self, name: str, gen: int) -> asyncio.Future[None]:
        fut = self._exits.get((name, gen))
        if fut is None:
            fut = self._exits[(name, gen)] = asyncio.get_running_loop().create_future()
            if (name, gen) not in self._workers:
                fut.set_result(None)
        return fut

    async def _estimate(self, name: str) -> None:
        m = self.scheduler.model(name)
        estimate: Estimate | None = None
        if m is not None:
            try:
                estimate = await asyncio.to_thread(self._estimator, m.entry.worker)
            except Exception as exc:  # never a 500: the load itself will say what is wrong
                log.warning("model %s: cannot estimate its memory: %r", name, exc)
        self._feed(self.scheduler.estimated(name, estimate))

    async def _time(self) -> None:
        """Tick the scheduler when its next deadline comes, or sooner after any event."""
        while not self.scheduler.closed:
            self._changed.clear()
            now = self._clock()
            due = self.scheduler.next_deadline(now)
            if due is not None and due <= now:
                self._feed(self.scheduler.tick(now))
                continue
            try:
                async with asyncio.timeout(None if due is None else due - now):
                    await self._changed.wait()
            except TimeoutError:
                pass

    async def _heartbeats(self) -> None:
        """Ping every loaded worker; one silent for heartbeat_timeout is hung (a stuck driver,
        a SIGSTOP, a swap storm): its requests end with a 503 and it is stopped."""
        loop = asyncio.get_running_loop()
        seq = 0
        while not self.scheduler.closed:
            seq += 1
            now = loop.time()
            for m in self.scheduler.models():
                worker = self._workers.get((m.name, m.gen)) if m.gen else None
                if worker is None or m.status is not ModelStatus.LOADED:
                    continue
                if worker.last_seen and now - worker.last_seen > self._heartbeat_timeout:
                    why = (f"not responding: no answer to heartbeats for {now - worker.last_seen:.0f} s "
                           f"(heartbeat_timeout {self._heartbeat_timeout:g} s)")
                    self._on_hung(worker, f"model {m.name!r} is {why}; retry")
                    self._feed(self.scheduler.worker_hung(m.name, m.gen, Failure(why, None,
                                                                                 tuple(worker.log_tail))))
                    continue
                worker.heartbeat(seq)
            try:  # closing ends the wait at once
                await asyncio.wait_for(self._closing.wait(), self._heartbeat_every)
            except TimeoutError:
                pass

    def _own(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pool task %s failed", task.get_name(), exc_info=task.exception())


class WorkerMemory:
    """The scheduler's memory probe: the system's, and each model's live worker's RSS."""

    def __init__(self, memory: Memory, pool: Pool) -> None:
        self._memory = memory
        self._pool = pool

    def available(self) -> int:
        return self._memory.available()

    def rss(self, model: str) -> int | None:
        worker = self._pool.worker(model)
        return self._memory.rss(worker.pid) if worker is not None and worker.pid is not None else None
