"""Driving the scheduler by hand in tests: scripted events in, effects collected, and a
few dicts standing for "the world" (which workers run, which were asked to stop)."""

from __future__ import annotations

import itertools
from pathlib import Path

from protocol.messages import WorkerConfig
from router.admission import MIB, Estimate
from router.catalog import ModelEntry, Policy
from router.effects import Deny, Effect, EstimateMemory, Grant, StartLoad, Stop
from router.modelstate import Failure, ModelStatus, Rejection
from router.scheduler import Scheduler, SchedulerSettings

GIB = 1024 * MIB
GRACE = 7.0  # stop_timeout in every scheduler here: a Stop with it is "by the ladder"


def entry(name: str, policy: Policy | None = None, n_ctx: int = 0) -> ModelEntry:
    return ModelEntry(name, Path(name), "fake", (), "config", WorkerConfig(name, name, n_ctx=n_ctx),
                      policy or Policy())


class Probe:
    """Memory as Linux shows it: `total` minus the anonymous part of every live worker's
    RSS (mapped weights count as available). A worker has touched nothing until loaded."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.live: dict[str, tuple[int, int]] = {}  # model -> (rss, mapped weights)

    def available(self) -> int:
        return self.total - sum(rss - mapped for rss, mapped in self.live.values())

    def rss(self, model: str) -> int | None:
        held = self.live.get(model)
        return held[0] if held is not None else None


class Sim:
    """One scheduler and a hand-cranked world. Every event method returns the effects it
    caused (estimates are answered at once unless `answer_estimates` is off); `effects`
    holds all of them in order, and the world remembers which workers were started
    (`loading`, `running`) and which were asked to stop (`stopping`)."""

    def __init__(self, *names: str, max_models: int = 4, max_waiting: int = 256, memory: int = 64 * GIB,
                 need: int = 100 * MIB, policies: dict[str, Policy] | None = None,
                 needs: dict[str, int] | None = None, answer_estimates: bool = True) -> None:
        policies = policies or {}
        self.need = need
        self.needs = needs or {}
        self.probe = Probe(memory)
        self.s = Scheduler([entry(n, policies.get(n)) for n in names],
                           SchedulerSettings(max_models=max_models, max_waiting=max_waiting,
                                             memory_margin=0, stop_timeout=GRACE), self.probe)
        self.now = 100.0
        self.answer_estimates = answer_estimates
        self.estimate_fails = False
        self.estimates: list[str] = []  # every EstimateMemory, in order
        self.effects: list[Effect] = []
        self.loading: dict[str, int] = {}  # model -> gen: StartLoad seen, no outcome yet
        self.running: dict[str, int] = {}  # model -> gen: loaded, not asked to stop
        self.stopping: dict[str, int] = {}  # model -> gen: asked to stop, not exited yet
        self._ids = itertools.count(1)

    # ---- the world ------------------------------------------------------------

    def need_of(self, name: str) -> int:
        return self.needs.get(name, self.need)

    def feed(self, effects: list[Effect]) -> list[Effect]:
        self.effects.extend(effects)
        out = list(effects)
        for e in effects:
            if isinstance(e, StartLoad):
                assert e.model not in self.loading and e.model not in self.running, e
                self.loading[e.model] = e.gen
            elif isinstance(e, Stop):
                for place in (self.loading, self.running):
                    if place.get(e.model) == e.gen:
                        del place[e.model]
                        self.stopping[e.model] = e.gen
            elif isinstance(e, EstimateMemory):
                self.estimates.append(e.model)
                if self.answer_estimates:
                    out.extend(self.feed(self.s.estimated(e.model, self.estimate(e.model))))
        return out

    def estimate(self, name: str) -> Estimate | None:
        if self.estimate_fails:
            return None
        need = self.need_of(name)
        return Estimate(need // 2, 0, need - need // 2)

    # ---- events -----------------------------------------------------------------

    def request(self, name: str, autoload: bool = True) -> int:
        waiter = next(self._ids)
        self.out = self.feed(self.s.request(waiter, name, self.now, autoload=autoload))
        return waiter

    def load(self, name: str) -> int:
        waiter = next(self._ids)
        self.out = self.feed(self.s.load(waiter, name, self.now))
        return waiter

    def release(self, waiter: int) -> list[Effect]:
        self.out = self.feed(self.s.release(waiter, self.now))
        return self.out

    def cancel(self, waiter: int) -> list[Effect]:
        self.out = self.feed(self.s.cancel(waiter, self.now))
        return self.out

    def unload(self, name: str) -> list[Effect]:
        self.out = self.feed(self.s.unload(name, self.now))
        return self.out

    def done(self, name: str, rss: int | None = None) -> list[Effect]:
        """The load of `name`'s current worker finished."""
        gen = self.loading.pop(name)
        self.running[name] = gen
        rss = self.need_of(name) if rss is None else rss
        self.probe.live[name] = (rss, self.need_of(name) // 2)
        self.out = self.feed(self.s.load_done(name, gen, self.now, rss))
        return self.out

    def fail(self, name: str, message: str = "corrupt weights") -> list[Effect]:
        gen = self.loading.pop(name)
        self.out = self.feed(self.s.load_failed(name, gen, self.now, Failure(message, 1)))
        return self.out

    def exited(self, name: str, failure: Failure | None = None) -> list[Effect]:
        """`name`'s worker is gone: the one asked to stop, else the running one (a crash)."""
        gen = self.stopping.pop(name) if name in self.stopping else self.running.pop(name)
        self.probe.live.pop(name, None)
        self.out = self.feed(self.s.worker_exited(name, gen, self.now, failure))
        return self.out

    def tick(self, now: float) -> list[Effect]:
        self.now = now
        self.out = self.feed(self.s.tick(now))
        return self.out

    def settle(self) -> None:
        """Every worker asked to stop exits; every load started finishes well."""
        while self.stopping or self.loading:
            for name in list(self.stopping):
                self.exited(name)
            for name in list(self.loading):
                self.done(name)

    def use(self, name: str) -> None:
        """One request that is served at once (after its load), and then time moves on."""
        waiter = self.hold(name)
        self.release(waiter)
        self.now += 1

    def hold(self, name: str) -> int:
        """A request for `name`, granted (the world settled first) and kept."""
        waiter = self.request(name)
        self.settle()
        assert self.granted(waiter), self.outcome(waiter)
        return waiter

    # ---- what happened ------------------------------------------------------------

    def outcome(self, waiter: int) -> Grant | Deny | None:
        told = [e for e in self.effects if isinstance(e, Grant | Deny) and e.waiter == waiter]
        assert len(told) <= 1, f"waiter {waiter} was answered twice: {told}"
        return told[0] if told else None

    def granted(self, waiter: int) -> bool:
        return isinstance(self.outcome(waiter), Grant)

    def denied(self, waiter: int) -> Rejection:
        told = self.outcome(waiter)
        assert isinstance(told, Deny), f"waiter {waiter}: {told}"
        return told.why

    def starts(self, name: str | None = None) -> list[StartLoad]:
        return [e for e in self.effects if isinstance(e, StartLoad) and name in (None, e.model)]

    def started(self) -> list[str]:
        return [e.model for e in self.starts()]

    def stops(self, name: str) -> list[Stop]:
        return [e for e in self.effects if isinstance(e, Stop) and e.model == name]

    def status(self, name: str) -> ModelStatus:
        m = self.s.model(name)
        assert m is not None, f"model {name} is not known"
        return m.status

    def wait_reason(self, name: str) -> str | None:
        m = self.s.model(name)
        assert m is not None
        return m.wait_reason

    def gen(self, name: str) -> int:
        m = self.s.model(name)
        assert m is not None
        return m.gen


def stops_in(effects: list[Effect]) -> list[Stop]:
    return [e for e in effects if isinstance(e, Stop)]


def reasons(effects: list[Effect]) -> list[str]:
    return [e.reason for e in stops_in(effects)]


