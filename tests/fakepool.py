"""Fake effects for driving the pool without processes: workers whose load finishes
when the test says so, memory the test sets, and a clock the test moves."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol.errors import ErrorKind
from protocol.messages import ModelInfo, WorkerConfig
from router.admission import MIB
from router.catalog import Catalog, ModelEntry, Policy
from router.footprint import Estimate
from router.pool import Pool
from router.slots import PoolSettings, ProgressFn, WorkerHandle
from router.supervisor import WorkerStartError

INFO = ModelInfo(backend="fake", device="cpu", n_ctx=64, n_ctx_train=64, n_vocab=10, n_params=1,
                 file_size=1, chat_template=True)


class FakeWorker:
    _pids = itertools.count(1000)

    def __init__(self, entry: ModelEntry, on_exit: Callable[[WorkerHandle], None], rss: int) -> None:
        self.entry = entry
        self.identity = f"{entry.name}/fake".encode()
        self.exit_code: int | None = None
        self.rss = rss
        self.mapped = rss // 2  # of its RSS, the weights: file pages the kernel calls available
        self.stops: list[float] = []
        self.ready: asyncio.Future[ModelInfo] = asyncio.get_running_loop().create_future()
        self._pid = next(self._pids)
        self._on_exit = on_exit
        self._alive = False
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
        self._alive = True
        try:
            return await self.ready
        except WorkerStartError:
            self._exit(1)
            raise

    async def stop(self, grace: float) -> None:
        self.stops.append(grace)
        self._stopping = True
        self._exit(0)

    def crash(self, code: int = -9) -> None:
        self._exit(code)

    def _exit(self, code: int) -> None:
        if self._alive:
            self._alive = False
            self.exit_code = code
            self._on_exit(self)

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


class Harness:
    """A pool of named fake models; `auto_ready` makes every load succeed at once."""

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
        self.estimates = 0  # calls of the estimator
        self.estimate_error: Exception | None = None
        self.clock = FakeClock()
        self.memory = FakeMemory(memory, self.launched)
        self.pool = Pool(Catalog(entries), PoolSettings(max_models=max_models, max_waiting=max_waiting,
                                                        memory_margin=0, stop_timeout=7.0),
                         self._launch, self.memory, self._estimate, clock=self.clock)

    def _launch(self, entry: ModelEntry, on_progress: ProgressFn,
                on_exit: Callable[[WorkerHandle], None]) -> WorkerHandle:
        worker = FakeWorker(entry, on_exit, self.needs.get(entry.name, self.need))
        if self.auto_ready:
            worker.ready.set_result(INFO)
        self.launched.append(worker)
        return worker

    def _estimate(self, config: WorkerConfig) -> Estimate:
        self.estimates += 1
        if self.estimate_error is not None:
            raise self.estimate_error
        need = self.needs.get(config.name, self.need)
        return Estimate(need // 2, 0, need - need // 2)

    def names(self) -> list[str]:
        return [w.entry.name for w in self.launched]

    def status(self, name: str) -> str:
        slot = self.pool.slot(name)
        assert slot is not None
        return slot.status.value

    def hold(self, name: str) -> Held:
        """A request for `name` that keeps its lease until `release`."""
        return Held(self.pool, name)


class Held:
    def __init__(self, pool: Pool, name: str) -> None:
        self.name = name
        self.leased = asyncio.Event()
        self._release = asyncio.Event()
        self.task = asyncio.create_task(self._run(pool), name=f"held:{name}")

    async def _run(self, pool: Pool) -> WorkerHandle:
        async with pool.lease(self.name, autoload=True) as worker:
            self.leased.set()
            await self._release.wait()
            return worker

    def release(self) -> None:
        self._release.set()


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


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))
