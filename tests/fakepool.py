"""Fakes for driving the pool (router.pool) without processes: workers whose load ends
when the test says so, memory the test sets, a clock the test moves, and waits that
turn the event loop instead of sleeping."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol.errors import ErrorKind
from protocol.messages import DownloadProgress, LoadProgress, ModelInfo, WorkerConfig, WorkerStatus
from router.admission import MIB, Estimate
from router.catalog import Catalog, ModelEntry, Policy
from router.pool import ModelView, Pool, PoolError, ProgressFn, WorkerHandle
from router.scheduler import SchedulerSettings
from router.supervisor import WorkerStartError

INFO = ModelInfo(backend="fake", device="cpu", n_ctx=64, n_ctx_train=64, n_vocab=10, n_params=1,
                 file_size=1, chat_template=True)
STOP_TIMEOUT = 7.0  # the pool's stop_timeout: the grace of a stop by the ladder
LOAD_TIMEOUT = 60.0


class FakeWorker:
    """A worker process from its launch on. Its load ends when the test resolves `ready`
    (a WorkerStartError there is a failed load); a death before that fails the start, as
    WorkerProcess's handshake does. `stop_gate`, when set, holds a stop until resolved."""

    _pids = itertools.count(1000)

    def __init__(self, entry: ModelEntry, on_progress: ProgressFn, on_exit: Callable[[WorkerHandle], None],
                 rss: int) -> None:
        self.entry = entry
        self.identity = f"{entry.name}/fake".encode()
        self.exit_code: int | None = None
        self.rss = rss
        self.mapped = rss // 2  # of its RSS, the weights: file pages the kernel calls available
        self.stops: list[float] = []  # the grace of every stop asked for
        self.status: WorkerStatus | None = None
        self.last_seen = 0.0  # never heard from: never judged hung
        self.heartbeats: list[int] = []
        self.load_timeouts: list[float] = []
        self.ready: asyncio.Future[ModelInfo] = asyncio.get_running_loop().create_future()
        self.stop_gate: asyncio.Future[None] | None = None
        self._pid = next(self._pids)
        self._on_progress = on_progress
        self._on_exit = on_exit
        self._alive = True
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def log_tail(self) -> list[str]:
        return [f"{self.entry.name} says goodbye"]

    async def start(self, load_timeout: float) -> ModelInfo:
        self.load_timeouts.append(load_timeout)
        try:
            return await self.ready
        except WorkerStartError:
            self._exit(1)  # after LoadFailed a worker exits by itself
            raise

    async def stop(self, grace: float) -> None:
        self.stops.append(grace)
        self._stopping = True
        if self.stop_gate is not None:
            await self.stop_gate
        self._exit(0)

    def heartbeat(self, seq: int) -> None:
        self.heartbeats.append(seq)

    def crash(self, code: int = -9) -> None:
        self._exit(code)

    def progress(self, msg: LoadProgress | DownloadProgress) -> None:
        """The worker reports how far its load has got."""
        self._on_progress(msg)

    def _exit(self, code: int) -> None:
        if not self._alive:
            return
        self._alive = False
        self.exit_code = code
        if not self.ready.done():  # its start hears of the death on a later turn of the loop
            self.ready.set_exception(WorkerStartError(
                f"worker for {self.entry.name} died while starting ({self.describe_exit()})", code))
        self._on_exit(self)  # at once, as WorkerProcess reports its exit

    def gone_error(self) -> tuple[ErrorKind, str]:
        return ErrorKind.WORKER_FAILED, f"{self.entry.name} exited"

    def describe_exit(self) -> str:
        return f"exit code {self.exit_code}"


class FakeMemory:
    """`total` minus what live fake workers hold, mapped weights excepted (as Linux does)."""

    def __init__(self, total: int, workers: list[FakeWorker]) -> None:
        self.total = total
        self._workers = workers

    def available(self) -> int:
        return self.total - sum(w.rss - w.mapped for w in self._workers if w.alive)

    def rss(self, pid: int) -> int | None:
        return next((w.rss for w in self._workers if w.pid == pid and w.alive), None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Ask:
    """One request to the pool: its ticket, and what it was told (once, maybe at once)."""

    def __init__(self, pool: Pool, name: str, autoload: bool = True) -> None:
        self._pool = pool
        self.told: list[WorkerHandle | PoolError] = []
        self.ticket = pool.request(name, self.told.append, autoload=autoload)

    @property
    def answered(self) -> bool:
        return bool(self.told)

    def worker(self) -> WorkerHandle:
        assert len(self.told) == 1 and not isinstance(self.told[0], PoolError), self.told
        return self.told[0]

    def error(self) -> PoolError:
        assert len(self.told) == 1 and isinstance(self.told[0], PoolError), self.told
        return self.told[0]

    def release(self) -> None:
        self._pool.release(self.ticket)


class Harness:
    """A pool of named fake models. `auto_ready` makes every load succeed at once; the
    estimator, on_status, on_progress and on_idle record what they are called with."""

    def __init__(self, *names: str, max_models: int = 4, max_waiting: int = 256,
                 memory: int = 64 * 1024 * MIB, need: int = 100 * MIB, auto_ready: bool = True,
                 policies: dict[str, Policy] | None = None, needs: dict[str, int] | None = None) -> None:
        policies = policies or {}
        entries = [ModelEntry(n, Path(n), "fake", (), "config", WorkerConfig(n, n),
                              policies.get(n, Policy())) for n in names]
        self.launched: list[FakeWorker] = []
        self.auto_ready = auto_ready
        self.need = need
        self.needs = needs or {}
        self.estimates: list[str] = []  # the estimator's calls, by model
        self.estimate_error: Exception | None = None
        self.statuses: list[tuple[str, str]] = []  # on_status: (model, public status)
        self.progress: list[tuple[str, str, str, float]] = []  # on_progress: (model, status, stage, value)
        self.idles = 0  # on_idle's calls
        self.clock = FakeClock()
        self.memory = FakeMemory(memory, self.launched)
        self.pool = Pool(Catalog(entries),
                         SchedulerSettings(max_models=max_models, max_waiting=max_waiting, memory_margin=0,
                                           stop_timeout=STOP_TIMEOUT),
                         self._launch, self.memory, self._estimate, load_timeout=LOAD_TIMEOUT,
                         on_status=self._on_status, on_progress=self._on_progress, on_idle=self._on_idle,
                         clock=self.clock)

    def _launch(self, entry: ModelEntry, on_progress: ProgressFn,
                on_exit: Callable[[WorkerHandle], None]) -> WorkerHandle:
        worker = FakeWorker(entry, on_progress, on_exit, self.needs.get(entry.name, self.need))
        if self.auto_ready:
            worker.ready.set_result(INFO)
        self.launched.append(worker)
        return worker

    def _estimate(self, config: WorkerConfig) -> Estimate:
        self.estimates.append(config.name)  # runs in a thread: a list append is atomic
        if self.estimate_error is not None:
            raise self.estimate_error
        need = self.needs.get(config.name, self.need)
        return Estimate(need // 2, 0, need - need // 2)

    def _on_status(self, view: ModelView) -> None:
        self.statuses.append((view.name, view.public_status))

    def _on_progress(self, view: ModelView) -> None:
        self.progress.append((view.name, view.public_status, view.progress.stage, view.progress.value))

    def _on_idle(self) -> None:
        self.idles += 1

    def names(self) -> list[str]:
        return [w.entry.name for w in self.launched]

    def status(self, name: str) -> str:
        view = self.pool.view(name)
        assert view is not None
        return view.public_status

    def ask(self, name: str, autoload: bool = True) -> Ask:
        return Ask(self.pool, name, autoload)

    async def use(self, name: str) -> WorkerHandle:
        """One request served (after its load, if need be) and released; then time moves on."""
        ask = self.ask(name)
        await until(lambda: ask.answered, f"{name} answered")
        worker = ask.worker()
        ask.release()
        self.clock.now += 1
        return worker


async def tick() -> None:
    """Let every ready callback run once: one turn of the loop, not a sleep."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.call_soon(fut.set_result, None)
    await fut


async def until(predicate: Callable[[], bool], what: str, turns: int = 10_000) -> None:
    """Turn the loop until `predicate` holds; fail after `turns` turns (no clock involved).
    Thread hand-offs (the estimate runs in one) can take many turns, hence the bound."""
    for _ in range(turns):
        if predicate():
            return
        await tick()
        await asyncio.to_thread(lambda: None)  # lets the estimate's thread finish its hop
    raise AssertionError(f"never happened: {what}")


async def turns(n: int) -> None:
    """Turn the loop `n` times (thread hops included): for checking that something does
    NOT happen, as far as the loop can tell without a clock."""
    for _ in range(n):
        await tick()
        await asyncio.to_thread(lambda: None)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))
