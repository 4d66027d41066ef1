"""The pool: the one owner of model state, and of the decisions about it.

Every model has a slot. A request leases its model's worker; if the model is not
loaded, the request waits in one FIFO admission queue until `admission.plan` lets
the model in (evicting idle least-recently-used models first), then joins the
model's single load. Decisions are made synchronously in `_pump`, so nothing can
interleave between a decision and its bookkeeping. Processes are reached only
through the `Launcher` and `Memory` effects, which tests replace with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from protocol.errors import ErrorKind
from protocol.messages import DownloadProgress, LoadProgress, WorkerConfig
from router.admission import MIB, Admit, Refuse, Wait, plan
from router.catalog import Catalog
from router.footprint import Estimate
from router.slots import (
    Failure,
    Launcher,
    Memory,
    ModelStatus,
    PoolError,
    PoolSettings,
    Slot,
    WorkerHandle,
    backoff_error,
    holders,
    live_rss,
    memory_budget,
    refusal_error,
    slot_rss,
    stopped_under_us,
)
from router.supervisor import WorkerStartError

log = logging.getLogger("modelherd.pool")

BACKOFF_FIRST_S = 5.0  # after a failed load; doubles per consecutive failure
BACKOFF_MAX_S = 300.0
REPLAN_S = 1.0  # while models wait, memory freed by other programs is noticed this often


class Pool:
    def __init__(self, catalog: Catalog, settings: PoolSettings, launcher: Launcher, memory: Memory,
                 estimator: Callable[[WorkerConfig], Estimate],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog = catalog
        self.settings = settings
        self._slots = {entry.name: Slot(entry) for entry in catalog}
        self._launch = launcher
        self._memory = memory
        self._estimator = estimator
        self._clock = clock
        self._queue: list[Slot] = []  # FIFO of models waiting for admission
        self._in_flight = 0
        self._waiting = 0
        self._draining = False
        self._drain_ends: float | None = None
        self._closed = False
        self._workers: set[WorkerHandle] = set()  # every live worker, whichever slot it serves
        self._tasks: set[asyncio.Task[Any]] = set()  # owned: asyncio keeps tasks only weakly
        self._estimates: dict[str, asyncio.Future[Estimate]] = {}
        self._changed = asyncio.Event()
        self.cut = asyncio.Event()  # set by a second signal: no more grace for anything
        self._janitor: asyncio.Task[None] | None = None

    # ---- views -------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def slot(self, name: str) -> Slot | None:
        entry = self.catalog.resolve(name)
        return self._slots[entry.name] if entry else None

    def rss(self, slot: Slot) -> int | None:
        return slot_rss(slot, self._memory)

    @property
    def idle(self) -> bool:
        return self._in_flight == 0

    def begin_drain(self, grace: float) -> None:
        """From now on every request is refused (503); those in flight have `grace` seconds,
        which is also all the time workers get to stop when the pool closes."""
        self._draining = True
        self._drain_ends = self._clock() + grace

    def cut_drain(self) -> None:
        """The grace is over (timeout or a second signal): requests waiting for a model
        are answered now (503) and close will not wait for anything."""
        self._draining = self._closed = True
        self._drain_ends = self._clock()
        for slot in self._slots.values():
            self._dequeue(slot)
            if slot.load_task is not None and not slot.load_task.done():
                slot.load_task.cancel()

    # ---- life -------------------------------------------------------------------

    def start(self) -> None:
        """Start the idle janitor and load the load_on_startup models."""
        self._janitor = asyncio.create_task(self._janitor_loop(), name="pool-janitor")
        for slot in self._slots.values():
            if slot.entry.policy.load_on_startup:
                self.start_load(slot)

    async def close(self, grace: float | None = None) -> None:
        """Stop every worker by the ladder. The grace is `grace` if given, else what is left
        of a drain's, else stop_timeout."""
        if grace is None:
            grace = (self.settings.stop_timeout if self._drain_ends is None
                     else max(0.0, self._drain_ends - self._clock()))
        self._draining = self._closed = True
        if self._janitor is not None:
            self._janitor.cancel()
        unloads = asyncio.gather(*(self._unload(s, grace) for s in self._slots.values()),
                                 return_exceptions=True)
        cut = asyncio.ensure_future(self.cut.wait())
        either: set[asyncio.Future[Any]] = {unloads, cut}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not unloads.done():  # cut short (a second signal): the ladder's last rungs now
            log.warning("stopping %d worker(s) without further grace", len(self._workers))
            await asyncio.gather(*(w.stop(grace=0) for w in list(self._workers)), return_exceptions=True)
        cut.cancel()
        await unloads
        # Whatever a race left behind is stopped too: no worker outlives the pool.
        await asyncio.gather(*(w.stop(grace=0) for w in list(self._workers)), return_exceptions=True)

    # ---- serving ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, name: str, autoload: bool) -> AsyncIterator[WorkerHandle]:
        """A loaded worker for `name`, counted in flight while the caller holds it."""
        slot = self._require(name)
        if self._draining:
            raise PoolError(ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry shortly")
        policy = slot.entry.policy
        if slot.in_flight >= policy.max_queue:
            raise PoolError(ErrorKind.RATE_LIMITED,
                            f"model {slot.entry.name!r} already has {slot.in_flight} requests queued or "
                            f"running (max_queue {policy.max_queue}); retry shortly")
        worker = slot.worker
        ready = slot.status is ModelStatus.LOADED and worker is not None and worker.alive
        if not ready:
            if not autoload and slot.status is not ModelStatus.LOADING:
                raise PoolError(ErrorKind.MODEL_NOT_LOADED,
                                f"model {slot.entry.name!r} is not loaded and autoload is off; "
                                "load it with POST /models/load")
            if self._waiting >= self.settings.max_waiting:
                raise PoolError(ErrorKind.UNAVAILABLE,
                                f"{self._waiting} requests are already waiting for models to load "
                                f"(max_waiting {self.settings.max_waiting}); retry later")
        slot.in_flight += 1
        self._in_flight += 1
        try:
            if not ready:
                slot.waiting += 1
                self._waiting += 1
                try:
                    worker = await self._ensure_loaded(slot, explicit=False)
                finally:
                    slot.waiting -= 1
                    self._waiting -= 1
            assert worker is not None
            slot.last_used = self._clock()
            yield worker
        finally:
            slot.in_flight -= 1
            self._in_flight -= 1
            slot.last_used = self._clock()
            if slot.in_flight == 0:
                self._state_changed()

    async def load(self, slot: Slot) -> WorkerHandle:
        """An explicit load (POST /models/load): like a request, but ignores the backoff."""
        if self._draining:
            raise PoolError(ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry shortly")
        return await self._ensure_loaded(slot, explicit=True)

    def start_load(self, slot: Slot) -> None:
        """Load in the background; the outcome shows in the slot's status."""
        if self._draining:
            raise PoolError(ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry shortly")
        task = asyncio.create_task(self.load(slot), name=f"load-request:{slot.entry.name}")
        self._own(task)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def unload(self, name: str) -> None:
        await self._unload(self._require(name), None)

    def _require(self, name: str) -> Slot:
        slot = self.slot(name)
        if slot is None:
            raise PoolError(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        return slot

    # ---- loading ----------------------------------------------------------------

    async def _ensure_loaded(self, slot: Slot, explicit: bool) -> WorkerHandle:
        if slot.estimate is None:  # read once, before the state below is looked at
            slot.estimate = await self._estimate(slot)
        admitted = False
        while True:  # at most twice round: once to be admitted, once to join the load
            worker = slot.worker
            if slot.status is ModelStatus.LOADED and worker is not None and worker.alive:
                return worker
            task = slot.load_task
            if task is not None and not task.done():
                return await self._join_load(slot, task)
            if slot.status is ModelStatus.FAILED and (
                    admitted or (not explicit and slot.retry_at > self._clock())):
                raise backoff_error(slot, self._clock())
            if admitted:  # the load ended (unloaded) before this waiter's turn came
                raise PoolError(ErrorKind.UNAVAILABLE, f"model {slot.entry.name!r} was unloaded; retry")
            await self._admission(slot)
            admitted = True

    async def _admission(self, slot: Slot) -> None:
        """Wait in the FIFO until `plan` admits the model (its load has then started)."""
        fut = slot.admission
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            slot.admission = fut
            self._queue.append(slot)
            self._pump()
            if not fut.done() and self._queue[0] is not slot:
                log.info("model %s waits to load behind %s", slot.entry.name,
                         ", ".join(s.entry.name for s in self._queue[: self._queue.index(slot)]))
        if fut.done():  # admitted, or refused, on the spot
            return fut.result()
        slot.admission_waiters += 1
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            if stopped_under_us(fut):
                raise self._stopped_error(slot, "waiting to load") from None
            raise
        finally:
            slot.admission_waiters -= 1
            if slot.admission_waiters == 0 and slot.admission is fut and not fut.done():
                # The last one waiting left (a client disconnected): nobody needs the load.
                log.info("model %s left the load queue: nobody waits for it any more", slot.entry.name)
                self._dequeue(slot)
                self._pump()

    def _stopped_error(self, slot: Slot, doing: str) -> PoolError:
        why = "modelherd is shutting down" if self._closed else "it was unloaded"
        return PoolError(ErrorKind.UNAVAILABLE, f"model {slot.entry.name!r} was {doing} and {why}")

    async def _estimate(self, slot: Slot) -> Estimate | None:
        fut = self._estimates.get(slot.entry.name)
        if fut is None:  # one file read however many requests ask at once
            fut = asyncio.ensure_future(asyncio.to_thread(self._estimator, slot.entry.worker))
            self._estimates[slot.entry.name] = fut
        try:
            return await asyncio.shield(fut)
        except Exception as exc:  # never a 500: the load itself will say what is wrong
            self._estimates.pop(slot.entry.name, None)  # and the next load asks again
            log.warning("model %s: cannot estimate its memory: %r", slot.entry.name, exc)
            return None

    def _dequeue(self, slot: Slot) -> None:
        if slot.admission is not None and not slot.admission.done():
            slot.admission.cancel()
        slot.admission = None
        slot.wait_reason = None
        if slot in self._queue:
            self._queue.remove(slot)

    async def _join_load(self, slot: Slot, task: asyncio.Task[WorkerHandle]) -> WorkerHandle:
        try:
            worker = await asyncio.shield(task)
        except asyncio.CancelledError:
            if stopped_under_us(task):
                raise self._stopped_error(slot, "loading") from None
            raise
        if not worker.alive:  # it ended between its load and this request's turn
            raise PoolError(*worker.gone_error())
        return worker

    # ---- the decisions ------------------------------------------------------------

    def _pump(self) -> None:
        """Admit queued models in order while `plan` allows: strictly FIFO among those
        waiting for a place. One whose old worker is still stopping waits for that alone
        and holds nobody up."""
        for slot in list(self._queue):
            if self._closed:
                return
            fut = slot.admission
            if fut is None or fut.done():
                self._queue.remove(slot)
                continue
            if slot.status is ModelStatus.UNLOADING:
                continue
            if slot.status is ModelStatus.LOADED and slot.worker is not None and slot.worker.alive:
                self._queue.remove(slot)  # loaded meanwhile (an explicit load): nothing to decide
                slot.admission = None
                fut.set_result(None)
                continue
            slots = list(self._slots.values())
            rss = live_rss(slots, self._memory)
            available = memory_budget(slots, rss, self._memory.available(), self.settings.memory_margin)
            decision = plan(slot.need, holders(slots, slot, rss), self.settings.max_models, available)
            if isinstance(decision, Wait):
                if slot.wait_reason != decision.reason:
                    log.info("model %s waits to load: %s", slot.entry.name, decision.reason)
                slot.wait_reason = decision.reason
                return
            self._queue.remove(slot)
            slot.admission = None
            slot.wait_reason = None
            if isinstance(decision, Refuse):
                error = refusal_error(slot, decision, available, self.settings.memory_margin)
                log.warning("%s", error.message)
                fut.set_exception(error)
                continue
            assert isinstance(decision, Admit)
            evictions = [self._evict(self._slots[name], slot) for name in decision.victims]
            self._begin_load(slot, evictions)
            fut.set_result(None)

    def _begin_load(self, slot: Slot, evictions: list[asyncio.Task[None]]) -> asyncio.Task[WorkerHandle]:
        slot.reset_progress()  # first: the status change is reported without the old load's
        slot.status = ModelStatus.LOADING  # holds its place from now, even while victims stop
        task = asyncio.create_task(self._load(slot, evictions), name=f"load:{slot.entry.name}")
        slot.load_task = task
        task.add_done_callback(self._load_finished)
        return task

    def _load_finished(self, task: asyncio.Task[WorkerHandle]) -> None:
        if not task.cancelled():
            task.exception()  # awaited by requests; marks a failure seen if none was waiting
        self._state_changed()  # a failed load gave its place back

    def _evict(self, victim: Slot, newcomer: Slot) -> asyncio.Task[None]:
        victim.status = ModelStatus.UNLOADING  # from now on no request can lease it
        log.info("evicting model %s (idle, least recently used) to make room for %s",
                 victim.entry.name, newcomer.entry.name)
        task = asyncio.create_task(self._stop(victim, self.settings.stop_timeout),
                                   name=f"evict:{victim.entry.name}")
        self._own(task)
        return task

    async def _load(self, slot: Slot, evictions: list[asyncio.Task[None]]) -> WorkerHandle:
        try:
            if evictions:
                await asyncio.wait(evictions)  # wait, not gather: a cancelled load lets them finish
            async with slot.lock:
                return await self._spawn_and_start(slot)
        except asyncio.CancelledError:
            if slot.worker is None:
                slot.status = ModelStatus.UNLOADED
            raise

    async def _spawn_and_start(self, slot: Slot) -> WorkerHandle:
        name = slot.entry.name
        slot.status = ModelStatus.LOADING
        worker = self._launch(slot.entry, lambda msg: self._on_progress(slot, msg),
                              lambda w: self._on_exit(slot, w))
        slot.worker = worker
        self._workers.add(worker)
        started = self._clock()
        try:
            info = await worker.start(self.settings.load_timeout)
            if not worker.alive:  # it died between Ready and now: its exit was not ours to handle
                raise WorkerStartError(f"the worker exited right after loading ({worker.describe_exit()})")
        except WorkerStartError as exc:
            slot.worker = None
            self._fail(slot, Failure(exc.message, worker.exit_code, list(worker.log_tail)),
                       load=True)
            raise PoolError(ErrorKind.LOAD_FAILED, f"model {name!r} failed to load: {exc.message}",
                            retry_after=math.ceil(slot.retry_at - self._clock())) from exc
        except asyncio.CancelledError:
            # The stop must finish even if this task is cancelled again meanwhile,
            # or the worker would outlive everything that knows about it.
            stopper = asyncio.create_task(worker.stop(grace=0), name=f"stop:{name}")
            self._own(stopper)
            slot.worker = None
            slot.status = ModelStatus.UNLOADED
            await asyncio.shield(stopper)
            raise
        slot.info = info
        slot.status = ModelStatus.LOADED
        slot.failure = None
        slot.failures = 0
        slot.retry_at = 0.0
        slot.last_used = self._clock()
        slot.last_rss = self.rss(slot) or 0
        log.info("model %s loaded in %.2f s (pid %s, %d MiB)", name, self._clock() - started,
                 worker.pid, slot.last_rss // MIB)
        return worker

    def _fail(self, slot: Slot, failure: Failure, load: bool) -> None:
        slot.failure = failure  # first: the status change is reported with it
        slot.status = ModelStatus.FAILED
        if load:  # a model that cannot load backs off instead of respawning per request
            slot.failures += 1
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (slot.failures - 1))
            slot.retry_at = self._clock() + delay
            log.error("model %s failed to load (%d in a row; automatic retries paused for %.0f s): %s",
                      slot.entry.name, slot.failures, delay, failure.message)

    def _on_progress(self, slot: Slot, msg: LoadProgress | DownloadProgress) -> None:
        slot.report_progress(msg)

    def _on_exit(self, slot: Slot, worker: WorkerHandle) -> None:
        self._workers.discard(worker)
        self._state_changed()
        if slot.worker is not worker or slot.status is ModelStatus.LOADING:
            return  # a replaced worker, or a load in progress: the load task reports the outcome
        slot.worker = None
        slot.info = None
        if worker.stopping:
            if slot.status is not ModelStatus.UNLOADING:
                slot.status = ModelStatus.UNLOADED
            return
        self._fail(slot, Failure(f"worker exited unexpectedly ({worker.describe_exit()})",
                                 worker.exit_code, list(worker.log_tail)), load=False)
        log.error("model %s failed: %s", slot.entry.name, slot.failure.message if slot.failure else "")

    # ---- stopping ---------------------------------------------------------------

    async def _unload(self, slot: Slot, grace: float | None) -> None:
        self._dequeue(slot)
        task = slot.load_task
        if task is not None and not task.done():
            if not task.cancelling():  # concurrent unloads cancel a load once, then all wait
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        slot.failures = 0  # an operator's unload clears the backoff
        slot.retry_at = 0.0
        await self._stop(slot, self.settings.stop_timeout if grace is None else grace)

    async def _stop(self, slot: Slot, grace: float) -> None:
        async with slot.lock:
            worker = slot.worker
            if worker is not None:
                slot.status = ModelStatus.UNLOADING
                await worker.stop(grace)
                if slot.worker is worker:
                    slot.worker = None
            if slot.load_task is None or slot.load_task.done():
                slot.status = ModelStatus.UNLOADED
            slot.info = None
        self._state_changed()

    # ---- time -------------------------------------------------------------------

    def reap_idle(self, now: float) -> float | None:
        """Unload models idle past their ttl; when the next one falls due (None: never)."""
        due: float | None = None
        for slot in self._slots.values():
            ttl = slot.entry.policy.ttl
            if (ttl <= 0 or slot.entry.policy.pinned or slot.status is not ModelStatus.LOADED
                    or slot.in_flight or slot.admission is not None):
                continue
            expiry = slot.last_used + ttl
            if expiry > now:
                due = expiry if due is None else min(due, expiry)
                continue
            slot.status = ModelStatus.UNLOADING
            log.info("unloading model %s: idle for %.0f s (ttl %g s)", slot.entry.name,
                     now - slot.last_used, ttl)
            self._own(asyncio.create_task(self._stop(slot, self.settings.stop_timeout),
                                          name=f"idle-unload:{slot.entry.name}"))
        return due

    async def _janitor_loop(self) -> None:
        while True:
            self._changed.clear()
            now = self._clock()
            due = self.reap_idle(now)
            if self._queue:
                self._pump()
                due = min(due or math.inf, now + REPLAN_S)
            timeout = None if due is None else max(0.0, due - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    def _state_changed(self) -> None:
        """A model became idle, or a place or memory was freed: re-plan, re-time."""
        self._pump()
        self._changed.set()

    def _own(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

