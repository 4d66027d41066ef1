"""The pool: one slot per catalog model, at most one live worker per slot.

The pool is the single owner of model state. A load is a named task kept in the
slot, so every request that needs the same model awaits the same load: two
requests that arrive together for an unloaded model start one worker. Loads and
unloads of one slot take turns on the slot's lock, so a request that arrives
while a model is being unloaded starts a fresh worker after the old one is gone,
never beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol.errors import ErrorKind
from protocol.messages import ModelInfo
from router.bridge import Bridge
from router.catalog import Catalog, ModelEntry
from router.supervisor import WorkerProcess, WorkerStartError

log = logging.getLogger("modelherd.pool")


class ModelStatus(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class PoolError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Failure:
    message: str
    exit_code: int | None
    log_tail: list[str]
    at: float


@dataclass
class Slot:
    entry: ModelEntry
    status: ModelStatus = ModelStatus.UNLOADED
    worker: WorkerProcess | None = None
    load_task: asyncio.Task[WorkerProcess] | None = None
    progress: float = 0.0
    in_flight: int = 0
    last_used: float = 0.0
    failure: Failure | None = None
    info: ModelInfo | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Pool:
    def __init__(self, catalog: Catalog, bridge: Bridge, log_level: str,
                 load_timeout: float, stop_timeout: float) -> None:
        self.catalog = catalog
        self._slots = {entry.name: Slot(entry) for entry in catalog}
        self._bridge = bridge
        self._log_level = log_level
        self._load_timeout = load_timeout
        self._stop_timeout = stop_timeout
        self._workers: set[WorkerProcess] = set()  # every live worker, whichever slot it serves
        self._stoppers: set[asyncio.Task[None]] = set()  # owned: asyncio keeps tasks only weakly

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def slot(self, name: str) -> Slot | None:
        entry = self.catalog.resolve(name)
        return self._slots[entry.name] if entry else None

    # ---- loading ---------------------------------------------------------------

    def start_load(self, slot: Slot) -> asyncio.Task[WorkerProcess]:
        """Start loading `slot` unless a load is already under way; return that load."""
        if slot.load_task is not None and not slot.load_task.done():
            return slot.load_task
        slot.load_task = asyncio.create_task(self._load(slot), name=f"load:{slot.entry.name}")
        # The result is awaited by requests; this keeps an unobserved failure from warning.
        slot.load_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return slot.load_task

    async def wait_loaded(self, slot: Slot) -> WorkerProcess:
        """Start (or join) the slot's load and wait for it; PoolError if it cannot be had."""
        task = self.start_load(slot)
        try:
            worker = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                raise PoolError(ErrorKind.UNAVAILABLE,
                                f"model {slot.entry.name!r} was unloaded while it was loading") from None
            raise
        if not worker.alive:  # it ended between its load and this request's turn
            raise PoolError(*worker.gone_error())
        return worker

    async def _load(self, slot: Slot) -> WorkerProcess:
        async with slot.lock:
            if slot.status is ModelStatus.LOADED and slot.worker is not None and slot.worker.alive:
                return slot.worker
            return await self._spawn_and_start(slot)

    async def _spawn_and_start(self, slot: Slot) -> WorkerProcess:
        name = slot.entry.name
        slot.status = ModelStatus.LOADING
        slot.progress = 0.0
        worker = WorkerProcess(slot.entry.worker, self._bridge, self._log_level,
                               lambda stage, v: self._on_progress(slot, v),
                               lambda w: self._on_exit(slot, w))
        slot.worker = worker
        self._workers.add(worker)
        started = time.monotonic()
        try:
            info = await worker.start(self._load_timeout)
        except WorkerStartError as exc:
            slot.worker = None
            slot.status = ModelStatus.FAILED
            slot.failure = Failure(exc.message, worker.exit_code, list(worker.log_tail), time.time())
            raise PoolError(ErrorKind.LOAD_FAILED, f"model {name!r} failed to load: {exc.message}") from exc
        except asyncio.CancelledError:
            # The stop must finish even if this task is cancelled again meanwhile,
            # or the worker would outlive everything that knows about it.
            stopper = asyncio.create_task(worker.stop(grace=0), name=f"stop:{name}")
            self._stoppers.add(stopper)
            stopper.add_done_callback(self._stoppers.discard)
            slot.worker = None
            slot.status = ModelStatus.UNLOADED
            await asyncio.shield(stopper)
            raise
        slot.info = info
        slot.status = ModelStatus.LOADED
        slot.failure = None
        slot.last_used = time.monotonic()
        log.info("model %s loaded in %.2f s (pid %s)", name, time.monotonic() - started, worker.pid)
        return worker

    def _on_progress(self, slot: Slot, value: float) -> None:
        slot.progress = value

    def _on_exit(self, slot: Slot, worker: WorkerProcess) -> None:
        self._workers.discard(worker)
        failed = self._bridge.fail_streams(worker.identity, *worker.gone_error())
        if slot.worker is not worker or slot.status is ModelStatus.LOADING:
            return  # a replaced worker, or a load in progress: the load task reports the outcome
        slot.worker = None
        slot.info = None
        if worker.stopping:
            slot.status = ModelStatus.UNLOADED
            return
        slot.status = ModelStatus.FAILED
        slot.failure = Failure(f"worker exited unexpectedly ({worker.describe_exit()})",
                               worker.exit_code, list(worker.log_tail), time.time())
        log.error("model %s failed: %s; %d request(s) aborted", slot.entry.name,
                  slot.failure.message, failed)

    # ---- serving ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, autoload: bool) -> AsyncIterator[WorkerProcess]:
        """A loaded worker for `name`, counted in flight while the caller holds it."""
        slot = self.slot(name)
        if slot is None:
            raise PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        slot.in_flight += 1
        try:
            worker = slot.worker
            if slot.status is not ModelStatus.LOADED or worker is None or not worker.alive:
                if not autoload and slot.status is not ModelStatus.LOADING:
                    raise PoolError(ErrorKind.MODEL_NOT_LOADED,
                                    f"model {slot.entry.name!r} is not loaded and autoload is off; "
                                    "load it with POST /models/load")
                worker = await self.wait_loaded(slot)
            slot.last_used = time.monotonic()
            yield worker
        finally:
            slot.in_flight -= 1
            slot.last_used = time.monotonic()

    async def unload(self, name: str) -> None:
        slot = self.slot(name)
        if slot is None:
            raise PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        task = slot.load_task
        if task is not None and not task.done():
            if not task.cancelling():  # concurrent unloads cancel a load once, then all wait
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with slot.lock:
            worker = slot.worker
            if worker is not None:
                slot.status = ModelStatus.UNLOADING
                await worker.stop(self._stop_timeout)
                if slot.worker is worker:
                    slot.worker = None
            slot.status = ModelStatus.UNLOADED
            slot.info = None

    async def close(self) -> None:
        await asyncio.gather(*(self.unload(s.entry.name) for s in self._slots.values()),
                             return_exceptions=True)
        # Whatever a race left behind is stopped too: no worker outlives the pool.
        await asyncio.gather(*(w.stop(grace=0) for w in list(self._workers)), return_exceptions=True)
