"""The scheduler: every model's state and the load queue, as one synchronous state machine.

Whatever happens to a model arrives as an event, a method call: a request wants its
model's worker (`request`), leaves the queue (`cancel`) or ends (`release`); a load
finished (`load_done`) or failed (`load_failed`); a worker exited (`worker_exited`) or
stopped answering (`worker_hung`); time passed (`tick`); an operator loads or unloads a
model; the daemon drains, cuts the drain short, closes. Each event returns the effects
to carry out, as values: `Estimate` a model's memory, `StartLoad` a worker, `Stop` one,
`Grant` a waiting request its worker or `Refuse` it, and `Status`/`Log` for whoever
reports. The pool (router.pool) carries them out and feeds the outcomes back in.

No event loop, sockets or clock: time comes with the events and memory through the
probe the scheduler is given, so tests drive it synchronously with scripted events.
Who makes room for a model is `admission.plan`'s decision, a pure function too.

Waiters are integers the caller picks. Workers are numbered here (a "generation" per
load), so news about a worker that has since been replaced is recognised and ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.errors import ErrorKind
from router import refusals
from router.admission import MIB, Admit, Estimate, Holder, Refuse, Wait, plan
from router.catalog import ModelEntry
from router.effects import Deny, Effect, EstimateMemory, Grant, Log, StartLoad, Status, Stop
from router.modelstate import HOLDING, Failure, Model, ModelStatus, Rejection


@dataclass(frozen=True)
class SchedulerSettings:
    max_models: int = 4  # loading or loaded at once; 0 = no cap
    max_waiting: int = 256  # requests waiting for a model to load, over all models
    memory_margin: int = 512 * MIB
    stop_timeout: float = 10.0
    backoff_first: float = 5.0  # after a failed load; doubles per failure in a row
    backoff_max: float = 300.0
    replan: float = 1.0  # while models queue, memory freed by other programs is looked at this often


class MemoryProbe(Protocol):
    """How the scheduler sees memory: what the system has available, what a model's live
    worker holds. Reads only; the daemon passes router.footprint's, tests a fake."""

    def available(self) -> int: ...
    def rss(self, model: str) -> int | None: ...


class Scheduler:
    def __init__(self, entries: Iterable[ModelEntry], settings: SchedulerSettings,
                 memory: MemoryProbe) -> None:
        self.settings = settings
        self._memory = memory
        self._models: dict[str, Model] = {e.name: Model(e) for e in entries}
        self._queue: list[Model] = []  # FIFO of models waiting for a place
        self._waiter_model: dict[int, Model] = {}  # every waiter, queued or served
        self._gens = 0
        self.draining = False
        self.closed = False

    # ---- views ----------------------------------------------------------------------

    def model(self, name: str) -> Model | None:
        return self._models.get(name)

    def models(self) -> list[Model]:
        return list(self._models.values())

    @property
    def waiting(self) -> int:
        return sum(len(m.waiters) for m in self._models.values())

    @property
    def idle(self) -> bool:
        """No request is served or waits: what a drain waits for."""
        return not self._waiter_model

    def next_deadline(self, now: float) -> float | None:
        """When `tick` next has something to do (an idle ttl ends, or queued models should
        look at memory again); None: nothing until another event."""
        due = [m.last_used + m.entry.policy.ttl for m in self._models.values() if self._reapable(m)]
        if any(m.wait_reason for m in self._queue):
            due.append(now + self.settings.replan)
        return min(due, default=None)

    # ---- requests -------------------------------------------------------------------

    def request(self, waiter: int, name: str, now: float, *, autoload: bool = True,
                explicit: bool = False) -> list[Effect]:
        """A request wants `name`'s worker. `explicit`: an operator's load, which skips the
        per-model bound and the failure backoff."""
        m = self._models[name]
        why = self._turn_away(m, now, autoload, explicit)
        if why is not None:
            return [Deny(waiter, why)]
        self._waiter_model[waiter] = m
        if m.ready:
            m.serving.add(waiter)
            m.last_used = now
            return [Grant(waiter, name, m.gen)]
        m.waiters.append(waiter)
        out: list[Effect] = []
        if m.status is not ModelStatus.LOADING:  # loading: it joins the load
            # Queued even while its old worker stops: it keeps its turn, and holds nobody up.
            self._want_load(m, out)
            self._pump(out)
        return out

    def _turn_away(self, m: Model, now: float, autoload: bool, explicit: bool) -> Rejection | None:
        name = m.name
        if self.draining or self.closed:
            return Rejection(ErrorKind.UNAVAILABLE, "modelherd is shutting down; retry shortly")
        if m.retired:
            return Rejection(ErrorKind.NOT_FOUND, f"model {name!r} not found")
        queued = len(m.serving) + len(m.waiters)
        if not explicit and queued >= m.entry.policy.max_queue:
            return Rejection(ErrorKind.RATE_LIMITED,
                             f"model {name!r} already has {queued} requests queued or running "
                             f"(max_queue {m.entry.policy.max_queue}); retry shortly")
        if m.ready:
            return None
        if not autoload and not explicit and m.status is not ModelStatus.LOADING:
            return Rejection(ErrorKind.MODEL_NOT_LOADED, f"model {name!r} is not loaded and autoload "
                                                         "is off; load it with POST /models/load")
        if self.waiting >= self.settings.max_waiting:
            return Rejection(ErrorKind.UNAVAILABLE,
                             f"{self.waiting} requests are already waiting for models to load "
                             f"(max_waiting {self.settings.max_waiting}); retry later")
        if m.status is ModelStatus.FAILED and not explicit and m.retry_at > now:
            return refusals.backoff(m, now)
        return None

    def release(self, waiter: int, now: float) -> list[Effect]:
        """A granted request ended (or one still waiting gave up: see `cancel`)."""
        m = self._waiter_model.pop(waiter, None)
        if m is None:
            return []
        out: list[Effect] = []
        if waiter in m.serving:
            m.serving.discard(waiter)
            m.last_used = now
        elif waiter in m.waiters:
            self._leave_queue(m, waiter, out)
        if not m.busy:
            self._idle(m, out)
            self._pump(out)
        return out

    cancel = release  # a waiter leaving the queue is a release that was never granted

    def _leave_queue(self, m: Model, waiter: int, out: list[Effect]) -> None:
        m.waiters.remove(waiter)
        if not m.waiters and m.queued:  # nobody needs the load any more
            self._dequeue(m)
            out.append(Log(logging.INFO, f"model {m.name} left the load queue: nobody waits for it any more"))

    def load(self, waiter: int, name: str, now: float) -> list[Effect]:
        return self.request(waiter, name, now, explicit=True)

    def unload(self, name: str, now: float, reason: str = "unloaded") -> list[Effect]:
        """An operator's unload: waiters are refused, the backoff is cleared, the worker
        stopped (at once while it loads, with stop_timeout's grace once it serves)."""
        m = self._models[name]
        out: list[Effect] = []
        self._refuse_waiters(m, out, refusals.stopped(m, "it was unloaded"))
        self._dequeue(m)
        m.failures, m.retry_at = 0, 0.0
        m.stale = False
        if m.status is ModelStatus.FAILED:
            self._set(m, ModelStatus.UNLOADED, out)
        self._stop(m, self.settings.stop_timeout, reason, out)
        self._pump(out)
        return out

    # ---- outcomes ---------------------------------------------------------------------

    def estimated(self, name: str, estimate: Estimate | None) -> list[Effect]:
        """The memory estimate arrived (None: it could not be made; the load will say why)."""
        m = self._models.get(name)
        if m is None or not m.estimating:
            return []
        m.estimating = False
        m.estimated = True
        m.estimate = estimate if estimate is not None else m.estimate
        out: list[Effect] = []
        self._pump(out)
        return out

    def load_done(self, name: str, gen: int, now: float, rss: int) -> list[Effect]:
        m = self._models.get(name)
        if m is None or m.gen != gen or m.status is not ModelStatus.LOADING:
            return []  # stopped meanwhile: its exit is what counts
        out: list[Effect] = []
        m.failure, m.failures, m.retry_at = None, 0, 0.0
        m.last_rss = max(m.last_rss, rss)
        m.last_used = now
        m.estimated = False  # the next load estimates afresh (the file may change)
        self._set(m, ModelStatus.LOADED, out)
        for waiter in m.waiters:
            m.serving.add(waiter)
            out.append(Grant(waiter, name, gen))
        m.waiters.clear()
        if not m.busy:
            self._idle(m, out)
        self._pump(out)
        return out

    def load_failed(self, name: str, gen: int, now: float, failure: Failure) -> list[Effect]:
        """The load of worker `gen` failed; its process is gone."""
        m = self._models.get(name)
        if m is None or m.gen != gen:
            return []
        if m.status is ModelStatus.UNLOADING:  # stopped while it loaded: it is gone now
            return self._gone(m, None)
        if m.status is not ModelStatus.LOADING:
            return []
        out: list[Effect] = []
        m.gen, m.started = 0, False
        m.failures += 1
        delay = min(self.settings.backoff_max, self.settings.backoff_first * 2 ** (m.failures - 1))
        m.retry_at = now + delay
        m.failure = failure
        m.estimated = False
        self._set(m, ModelStatus.FAILED, out)
        out.append(Log(logging.ERROR, f"model {name} failed to load ({m.failures} in a row; automatic "
                                      f"retries paused for {delay:.0f} s): {failure.message}"))
        self._refuse_waiters(m, out, Rejection(ErrorKind.LOAD_FAILED,
                                               f"model {name!r} failed to load: {failure.message}",
                                               math.ceil(delay)))
        self._pump(out)
        return out

    def worker_exited(self, name: str, gen: int, now: float, failure: Failure | None) -> list[Effect]:
        """Worker `gen` is gone: stopped on purpose (`failure` None) or not."""
        m = self._models.get(name)
        if m is None or m.gen != gen or not m.started:
            return []
        if m.status is ModelStatus.LOADING:
            m.exited = True  # its load reports the outcome (load_failed); a stop has nothing to do
            return []
        return self._gone(m, failure)

    def _gone(self, m: Model, failure: Failure | None) -> list[Effect]:
        """Its worker has exited: the model's place is free."""
        out: list[Effect] = []
        name = m.name
        m.gen, m.started, m.exited = 0, False, False
        if m.status is ModelStatus.LOADED and failure is not None:
            m.failure = failure
            self._set(m, ModelStatus.FAILED, out)
            out.append(Log(logging.ERROR, f"model {name} failed: {failure.message}"))
        elif m.status is not ModelStatus.FAILED:
            self._set(m, ModelStatus.UNLOADED, out)
        for other in self._models.values():  # a victim gone: loads waiting for it may start
            if name in other.victims:
                other.victims.discard(name)
                self._start_if_clear(other, out)
        if m.retired and not m.busy:
            self._forget(m)
        elif m.waiters:
            self._want_load(m, out)  # requests came while it stopped: load it again
        self._pump(out)
        return out

    def worker_hung(self, name: str, gen: int, failure: Failure) -> list[Effect]:
        """Worker `gen` answers nothing any more: failed, and stopped without grace."""
        m = self._models.get(name)
        if m is None or m.gen != gen or m.status is not ModelStatus.LOADED:
            return []
        out: list[Effect] = []
        m.failure = failure
        self._set(m, ModelStatus.FAILED, out)
        out.append(Log(logging.ERROR, f"model {name} failed: {failure.message}"))
        out.append(Stop(name, gen, 0.0, failure.message))
        return out

    # ---- time and the daemon's life ----------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Unload models idle past their ttl; let queued models look at memory again."""
        out: list[Effect] = []
        for m in self._models.values():
            if self._reapable(m) and m.last_used + m.entry.policy.ttl <= now:
                out.append(Log(logging.INFO, f"unloading model {m.name}: idle for {now - m.last_used:.0f} s "
                                             f"(ttl {m.entry.policy.ttl:g} s)"))
                self._stop(m, self.settings.stop_timeout, "idle", out)
        self._pump(out)
        return out

    def drain(self) -> None:
        """From now on every new request is refused; those waiting and served go on."""
        self.draining = True

    def cut(self) -> list[Effect]:
        """The drain's grace is over: waiters are refused now and loads stopped."""
        self.draining = True
        out: list[Effect] = []
        for m in self._models.values():
            self._refuse_waiters(m, out, refusals.stopped(m, "modelherd is shutting down"))
            self._dequeue(m)
            if m.status is ModelStatus.LOADING:
                self._stop(m, 0.0, "shutdown", out)
        return out

    def close(self, grace: float) -> list[Effect]:
        """Stop everything: loads at once, loaded models with `grace` to finish."""
        out = self.cut()
        self.closed = True
        for m in self._models.values():
            self._stop(m, grace, "shutdown", out)
        return out

    # ---- the catalog changes (a reload) ------------------------------------------------

    def update_catalog(self, entries: Sequence[ModelEntry], now: float) -> list[Effect]:
        """New models appear; removed ones are unloaded once idle, then forgotten; changed
        ones are reloaded once idle (their next load uses the new entry)."""
        out: list[Effect] = []
        fresh = {e.name: e for e in entries}
        for name, m in list(self._models.items()):
            entry = fresh.pop(name, None)
            if entry is None:
                m.retired = True
                self._refuse_waiters(m, out, Rejection(ErrorKind.NOT_FOUND,
                                                       f"model {name!r} was removed from the configuration"))
                self._dequeue(m)
                if m.status in HOLDING and not m.busy:
                    self._stop(m, self.settings.stop_timeout, "removed from the configuration", out)
                if m.status not in HOLDING and not m.busy:
                    self._forget(m)
                continue
            m.retired = False  # removed, then added back before it went
            if entry != m.entry:
                changed = entry.worker != m.entry.worker
                m.entry, m.estimated = entry, False
                m.failures, m.retry_at = 0, 0.0  # a new configuration deserves a fresh try
                running = m.status is ModelStatus.LOADED or (m.status is ModelStatus.LOADING and m.started)
                if changed and running:  # its worker runs the old entry: reload once idle
                    m.stale = True
                    if not m.busy and m.status is ModelStatus.LOADED:
                        self._idle(m, out)
                out.append(Status(name))
        for name, entry in fresh.items():
            self._models[name] = Model(entry)
            out.append(Status(name))
        self._pump(out)
        return out

    # ---- inner workings ----------------------------------------------------------------

    def _want_load(self, m: Model, out: list[Effect]) -> None:
        """Queue `m` for a place, asking for its memory estimate if it has none yet (it
        takes its turn once the estimate is in)."""
        if not m.estimated and not m.estimating:
            m.estimating = True
            out.append(EstimateMemory(m.name))
        self._enqueue(m, out)

    def _enqueue(self, m: Model, out: list[Effect]) -> None:
        if m.queued:
            return
        m.queued = True
        self._queue.append(m)
        ahead = [q.name for q in self._queue[:-1]]
        if ahead:
            out.append(Log(logging.INFO, f"model {m.name} waits to load behind {', '.join(ahead)}"))

    def _dequeue(self, m: Model) -> None:
        if m.queued:
            self._queue.remove(m)
        m.queued = False
        m.wait_reason = None

    def _pump(self, out: list[Effect]) -> None:
        """Admit queued models in order while `plan` allows: strictly FIFO among those
        waiting for a place. One whose old worker is still stopping waits for that alone
        and holds nobody up."""
        for m in list(self._queue):
            if self.closed:
                return
            if m.status is ModelStatus.UNLOADING or m.estimating:
                continue  # it waits for its old worker to go, or for its estimate
            if m.status in (ModelStatus.LOADED, ModelStatus.LOADING):  # loaded meanwhile
                self._dequeue(m)
                continue
            available = self._budget()
            decision = plan(m.need, self._holders(exclude=m), self.settings.max_models, available)
            if isinstance(decision, Wait):
                if m.wait_reason != decision.reason:
                    out.append(Log(logging.INFO, f"model {m.name} waits to load: {decision.reason}"))
                m.wait_reason = decision.reason
                return
            self._dequeue(m)
            if isinstance(decision, Refuse):
                why = refusals.cannot_fit(m, decision, available, self.settings.memory_margin)
                out.append(Log(logging.WARNING, why.message))
                self._refuse_waiters(m, out, why)
                continue
            assert isinstance(decision, Admit)
            self._admit(m, decision.victims, out)

    def _admit(self, m: Model, victims: tuple[str, ...], out: list[Effect]) -> None:
        self._gens += 1
        m.gen, m.started = self._gens, False
        self._set(m, ModelStatus.LOADING, out)  # holds its place from now, even while victims stop
        for name in victims:
            victim = self._models[name]
            out.append(Log(logging.INFO, f"evicting model {name} (idle, least recently used) "
                                         f"to make room for {m.name}"))
            self._stop(victim, self.settings.stop_timeout, f"evicted for {m.name}", out)
            if victim.started:
                m.victims.add(name)
        m.evicted = victims
        self._start_if_clear(m, out)

    def _start_if_clear(self, m: Model, out: list[Effect]) -> None:
        if m.status is ModelStatus.LOADING and not m.started and not m.victims:
            m.started = True
            m.stale = False  # this worker loads the entry as it is now
            out.append(StartLoad(m.name, m.gen, m.evicted))

    def _stop(self, m: Model, grace: float, reason: str, out: list[Effect]) -> None:
        if m.status is ModelStatus.LOADING and (not m.started or m.exited):
            # Still waiting for its victims, or its worker is gone already: nothing to stop.
            m.victims.clear()
            m.gen, m.started, m.exited = 0, False, False
            self._set(m, ModelStatus.UNLOADED, out)
            return
        if m.status is ModelStatus.LOADING:
            grace = 0.0  # a load has nothing to finish
        elif m.status is not ModelStatus.LOADED:
            return
        self._set(m, ModelStatus.UNLOADING, out)  # from now on no request can lease it
        out.append(Stop(m.name, m.gen, grace, reason))

    def _idle(self, m: Model, out: list[Effect]) -> None:
        """`m` has no request left: a retired or changed model may go now."""
        if m.retired and m.status is ModelStatus.LOADED:
            self._stop(m, self.settings.stop_timeout, "removed from the configuration", out)
        elif m.retired and m.status not in HOLDING:
            self._forget(m)
        elif m.stale and m.status is ModelStatus.LOADED:
            m.stale = False  # a changed model, idle at last: the next request loads the new entry
            self._stop(m, self.settings.stop_timeout, "its configuration changed", out)

    def _forget(self, m: Model) -> None:
        self._dequeue(m)
        if self._models.get(m.name) is m:  # never a successor of the same name
            del self._models[m.name]

    def _set(self, m: Model, status: ModelStatus, out: list[Effect]) -> None:
        if m.status is not status:
            m.status = status
            out.append(Status(m.name))

    def _refuse_waiters(self, m: Model, out: list[Effect], why: Rejection) -> None:
        for waiter in m.waiters:
            self._waiter_model.pop(waiter, None)
            out.append(Deny(waiter, why))
        m.waiters.clear()

    def _reapable(self, m: Model) -> bool:
        policy = m.entry.policy
        return (policy.ttl > 0 and not policy.pinned and m.status is ModelStatus.LOADED and not m.busy)

    # ---- memory ---------------------------------------------------------------------

    def _live(self) -> Iterator[tuple[Model, int]]:
        """Models holding a place, with their worker's RSS (read once per decision)."""
        for m in self._models.values():
            if m.status in HOLDING:
                yield m, (self._memory.rss(m.name) or 0) if m.started else 0

    def _holders(self, exclude: Model) -> list[Holder]:
        out = []
        for m, rss in self._live():
            if m is exclude:
                continue
            pinned = m.entry.policy.pinned
            idle = m.status is ModelStatus.LOADED and not m.busy and not pinned
            out.append(Holder(m.name, idle, pinned, m.last_used, max(m.need, rss)))
        return out

    def _budget(self) -> int:
        """Free memory minus the margin, minus what live models claim beyond what the kernel
        already counts as used. Mapped weights look "available" to the kernel (page cache)
        though dropping them would thrash, and a loading model has not touched its memory
        yet: both are subtracted here. The kernel does count the anonymous part of RSS."""
        claimed = 0
        for m, used in self._live():
            weights = m.estimate.weights if m.estimate else 0
            claimed += max(m.need, used) - max(0, used - weights)
        return self._memory.available() - self.settings.memory_margin - claimed
