"""Random event sequences against the scheduler (Hypothesis), with a small model of the
world answering its effects at random points; invariants checked after every step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from router.admission import MIB, Estimate
from router.catalog import ModelEntry, Policy
from router.effects import Deny, Effect, EstimateMemory, Grant, StartLoad, Stop
from router.modelstate import HOLDING, Failure, ModelStatus
from router.scheduler import Scheduler, SchedulerSettings
from tests.schedsim import GRACE, entry

# ---- random event sequences ------------------------------------------------------------

NAMES = ("a", "b", "c", "p")
NEEDS = {"a": 100 * MIB, "b": 150 * MIB, "c": 250 * MIB, "p": 100 * MIB}
POLICIES = {"a": Policy(ttl=2), "b": Policy(ttl=0), "c": Policy(ttl=3, max_queue=3),
            "p": Policy(pinned=True, ttl=2)}
MAX_MODELS = 2
BY_OPERATOR = ("unload", "cut", "close", "hung")  # the only events that may stop a busy model


def world_estimate(name: str) -> Estimate:
    need = NEEDS[name]
    return Estimate(need // 2, 0, need - need // 2)


@dataclass
class Proc:
    """A worker as the world sees it."""

    name: str
    gen: int
    entry: ModelEntry  # what it was started with
    state: str  # "loading" | "loaded" | "stopping" | "dead" (exited, its load not reported yet)
    load_reported: bool = False
    hung: bool = False
    rss: int = 0


class WorldProbe:
    """Memory the random world's workers take: each loaded one its rss, half of it mapped."""

    def __init__(self, machine: SchedulerMachine) -> None:
        self._machine = machine

    def available(self) -> int:
        return 450 * MIB - sum(p.rss // 2 for p in self._machine.procs.values() if p.state != "dead")

    def rss(self, model: str) -> int | None:
        m = self._machine.s.model(model)
        proc = self._machine.procs.get((model, m.gen)) if m is not None else None
        return proc.rss if proc is not None and proc.state != "dead" else None


class SchedulerMachine(RuleBasedStateMachine):
    """Random events against the scheduler; the world answers its effects later, at random.

    The core world reports a loading worker's death and its load's failure as one step,
    and the catalog never changes. The full world adds catalog reloads and the gap the
    pool really has between those two reports (router.pool: the exit callback comes
    first, the load task's failure a loop turn later, and other events may come between)."""

    catalog_changes = False
    split_load_death = False

    def __init__(self) -> None:
        super().__init__()
        self.catalog = {n: entry(n, POLICIES[n]) for n in NAMES}
        self.s = Scheduler(self.catalog.values(),
                           SchedulerSettings(max_models=MAX_MODELS, max_waiting=10, memory_margin=0,
                                             stop_timeout=GRACE), WorldProbe(self))
        self.now = 0.0
        self.ids = itertools.count(1)
        self.waiting: dict[int, str] = {}  # asked, not answered
        self.serving: dict[int, str] = {}  # granted, not released
        self.answered: set[int] = set()  # granted or denied, ever
        self.estimates: list[str] = []  # asked for, not answered
        self.procs: dict[tuple[str, int], Proc] = {}
        self.gone: list[tuple[str, int]] = []  # workers whose every report is in
        self.started_gens: set[int] = set()
        self.stopped_gens: set[int] = set()
        self.event = ""
        self.steps = 0

    # ---- feeding events and checking effects -----------------------------------------

    def feed(self, event: str, effects: list[Effect]) -> list[Effect]:
        self.event = event
        for e in effects:
            if isinstance(e, Grant):
                assert e.waiter in self.waiting and e.waiter not in self.answered, e
                m = self.s.model(e.model)
                assert m is not None and m.status is ModelStatus.LOADED and m.gen == e.gen, (e, m)
                proc = self.procs.get((e.model, e.gen))
                assert proc is not None and proc.state == "loaded", (e, proc)
                self.answered.add(e.waiter)
                self.serving[e.waiter] = self.waiting.pop(e.waiter)
            elif isinstance(e, Deny):
                assert e.waiter in self.waiting and e.waiter not in self.answered, e
                self.answered.add(e.waiter)
                del self.waiting[e.waiter]
            elif isinstance(e, StartLoad):
                assert e.gen not in self.started_gens, f"two StartLoads for gen {e.gen}"
                self.started_gens.add(e.gen)
                m = self.s.model(e.model)
                assert m is not None and m.status is ModelStatus.LOADING and m.gen == e.gen, (e, m)
                assert not self.s.closed
                self.procs[(e.model, e.gen)] = Proc(e.model, e.gen, m.entry, "loading")
            elif isinstance(e, Stop):
                assert e.gen not in self.stopped_gens, f"two Stops for gen {e.gen}"
                self.stopped_gens.add(e.gen)
                proc = self.procs.get((e.model, e.gen))
                assert proc is not None, f"Stop for a worker never started or long gone: {e}"
                if event not in BY_OPERATOR:
                    busy = [w for w, name in self.serving.items() if name == e.model]
                    assert not busy, f"{event} stopped {e.model} while it serves {busy}: {e}"
                if proc.state == "loading":
                    assert e.grace == 0.0, f"a load is stopped at once: {e}"
                if proc.state in ("loading", "loaded"):
                    proc.state = "stopping"
            elif isinstance(e, EstimateMemory):
                self.estimates.append(e.model)
        return effects

    def proc_list(self, *states: str) -> list[Proc]:
        return [p for _, p in sorted(self.procs.items()) if p.state in states]

    def pick(self, data: st.DataObject, procs: list[Proc]) -> Proc:
        """One of `procs`, drawn by (model, gen) so a failing example reads well."""
        return self.procs[data.draw(st.sampled_from([(p.name, p.gen) for p in procs]))]

    # ---- requests --------------------------------------------------------------------

    def known(self) -> list[str]:
        return [m.name for m in self.s.models()]

    @precondition(lambda self: self.known())
    @rule(data=st.data(), autoload=st.sampled_from([True, True, True, False]))
    def request(self, data: st.DataObject, autoload: bool) -> None:
        # models on their way in or out are asked for more often: that is where it is hard
        moving = [m.name for m in self.s.models() if m.status in (ModelStatus.LOADING, ModelStatus.UNLOADING)]
        name = data.draw(st.sampled_from(self.known() + moving * 2))
        waiter = next(self.ids)
        self.waiting[waiter] = name
        self.feed("request", self.s.request(waiter, name, self.now, autoload=autoload))

    @precondition(lambda self: self.serving or self.waiting)
    @rule(data=st.data(), served=st.sampled_from([True, True, True, False]))
    def end_request(self, data: st.DataObject, served: bool) -> None:
        """A request served ends (`release`), or one still waiting gives up (`cancel`)."""
        if not (self.serving if served else self.waiting):
            served = not served
        waiter = data.draw(st.sampled_from(sorted(self.serving if served else self.waiting)))
        if served:
            del self.serving[waiter]
        else:
            del self.waiting[waiter]
        if served:
            self.feed("release", self.s.release(waiter, self.now))
        else:
            self.feed("cancel", self.s.cancel(waiter, self.now))

    @precondition(lambda self: self.known())
    @rule(data=st.data(), action=st.sampled_from(["load", "unload"]))
    def operator(self, data: st.DataObject, action: str) -> None:
        name = data.draw(st.sampled_from(self.known()))
        if action == "unload":
            self.feed("unload", self.s.unload(name, self.now))
            return
        waiter = next(self.ids)
        self.waiting[waiter] = name
        self.feed("load", self.s.load(waiter, name, self.now))

    # ---- the world answers -----------------------------------------------------------

    @precondition(lambda self: self.estimates)
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def answer_estimate(self, data: st.DataObject, ok: bool) -> None:
        name = self.estimates.pop(data.draw(st.integers(0, len(self.estimates) - 1)))
        self.feed("estimated", self.s.estimated(name, world_estimate(name) if ok else None))

    @precondition(lambda self: self.proc_list("loading"))
    @rule(data=st.data(), outcome=st.sampled_from(["done"] * 4 + ["done, bigger than estimated", "died"]))
    def finish_load(self, data: st.DataObject, outcome: str) -> None:
        """A load ends: well, or its worker dies (the load fails, or dies while loading)."""
        proc = self.pick(data, self.proc_list("loading"))
        if outcome == "died":
            self._die_loading(proc)
            return
        proc.load_reported = True
        proc.state = "loaded"
        proc.rss = NEEDS[proc.name] * (1 if outcome == "done" else 2)
        self.feed("load_done", self.s.load_done(proc.name, proc.gen, self.now, proc.rss))

    @precondition(lambda self: self.proc_list("stopping", "dead"))
    @rule(data=st.data(), ok=st.booleans())
    def late_load_outcome(self, data: st.DataObject, ok: bool) -> None:
        """A stopped load (or a dead one) reports: nothing to decide any more, except for
        a worker that died on its own (`dead`): its failure is what counts."""
        candidates = [p for p in self.proc_list("stopping", "dead") if not p.load_reported]
        if not candidates:
            return
        proc = self.pick(data, candidates)
        proc.load_reported = True
        if proc.state == "dead" or not ok:
            out = self.feed("load_failed", self.s.load_failed(proc.name, proc.gen, self.now,
                                                               Failure("stopped while loading")))
        else:
            out = self.feed("load_done", self.s.load_done(proc.name, proc.gen, self.now, 1))
        if proc.state == "stopping" and ok:
            assert out == [], f"a stopped load that loaded after all changed something: {out}"
        if proc.state == "dead" or not ok:  # a failed load: its worker is gone, and the stop over
            self._gone(proc)

    def _die_loading(self, proc: Proc) -> None:
        """A loading worker dies: the pool hears of its exit, then of its load's failure."""
        proc.state = "dead"
        out = self.feed("worker_exited", self.s.worker_exited(proc.name, proc.gen, self.now,
                                                              Failure("died while starting", -9)))
        assert out == [], f"the exit of a loading worker is its load's to report: {out}"
        if not self.split_load_death:
            proc.load_reported = True
            self.feed("load_failed", self.s.load_failed(proc.name, proc.gen, self.now,
                                                        Failure("died while starting", -9)))
            self._gone(proc)

    @precondition(lambda self: self.proc_list("stopping"))
    @rule(data=st.data())
    def exit_stopped(self, data: st.DataObject) -> None:
        proc = self.pick(data, self.proc_list("stopping"))
        self._gone(proc)
        self.feed("worker_exited", self.s.worker_exited(proc.name, proc.gen, self.now, None))
        if not proc.load_reported:
            # A load that was stopped: the pool hears of the exit and of the load's end in
            # either order (`late_load_outcome` sends the latter first); here it is last.
            proc.load_reported = True
            assert self.feed("load_failed", self.s.load_failed(proc.name, proc.gen, self.now,
                                                               Failure("stopped"))) == []

    @precondition(lambda self: self.proc_list("loaded"))
    @rule(data=st.data(), hang=st.booleans())
    def crash_loaded(self, data: st.DataObject, hang: bool) -> None:
        proc = self.pick(data, self.proc_list("loaded"))
        if hang:
            proc.hung = True
            out = self.feed("hung", self.s.worker_hung(proc.name, proc.gen, Failure("no heartbeat")))
            assert [e for e in out if isinstance(e, Stop)] == [Stop(proc.name, proc.gen, 0.0, "no heartbeat")]
        else:
            self._gone(proc)
            self.feed("crash", self.s.worker_exited(proc.name, proc.gen, self.now, Failure("crashed", -11)))

    def _gone(self, proc: Proc) -> None:
        del self.procs[(proc.name, proc.gen)]
        self.gone.append((proc.name, proc.gen))

    @precondition(lambda self: self.gone)
    @rule(data=st.data(), what=st.sampled_from(["done", "failed", "exited", "hung"]))
    def stale_news(self, data: st.DataObject, what: str) -> None:
        """News of a worker whose every report is in already: ignored."""
        name, gen = data.draw(st.sampled_from(self.gone))
        failure = Failure("old news")
        if what == "done":
            out = self.s.load_done(name, gen, self.now, 1)
        elif what == "failed":
            out = self.s.load_failed(name, gen, self.now, failure)
        elif what == "exited":
            out = self.s.worker_exited(name, gen, self.now, failure)
        else:
            out = self.s.worker_hung(name, gen, failure)
        assert self.feed("stale", out) == [], f"stale {what} for {name} gen {gen}: {out}"

    # ---- time and the daemon's life ----------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed("tick", self.s.tick(self.now))
        due = self.s.next_deadline(self.now)
        assert due is None or due > self.now, "tick left something due now undone"

    # The daemon's end comes late in a run: everything after it is refused.

    @precondition(lambda self: self.steps > 40 and not self.s.draining)
    @rule()
    def drain(self) -> None:
        self.s.drain()

    @precondition(lambda self: self.steps > 44 and not self.s.closed)
    @rule()
    def cut(self) -> None:
        self.feed("cut", self.s.cut())
        assert not self.waiting, f"cut left waiters waiting: {self.waiting}"

    @precondition(lambda self: self.steps > 44 and not self.s.closed)
    @rule(grace=st.sampled_from([0.0, 3.0]))
    def close(self, grace: float) -> None:
        self.feed("close", self.s.close(grace))
        assert not self.waiting, f"close left waiters waiting: {self.waiting}"
        assert all(m.status not in (ModelStatus.LOADING, ModelStatus.LOADED) for m in self.s.models())

    @precondition(lambda self: self.catalog_changes and not self.s.closed)
    @rule(keep=st.sets(st.sampled_from(NAMES)), changed=st.sets(st.sampled_from(NAMES)))
    def update_catalog(self, keep: set[str], changed: set[str]) -> None:
        self.catalog = {n: entry(n, POLICIES[n], n_ctx=self._bump(n) if n in changed else self._ctx(n))
                        for n in sorted(keep)}
        self.feed("update_catalog", self.s.update_catalog(list(self.catalog.values()), self.now))

    def _ctx(self, name: str) -> int:
        m = self.s.model(name)
        return m.entry.worker.n_ctx if m is not None else 0

    def _bump(self, name: str) -> int:
        return self._ctx(name) + 1

    # ---- invariants -----------------------------------------------------------------

    @invariant()
    def count_steps(self) -> None:
        """Not a check: invariants run once after every step, so this counts them."""
        self.steps += 1

    @invariant()
    def places(self) -> None:
        """At most max_models places are taken. A load waiting for its victims to stop
        holds its place already, so those victims are not counted twice."""
        models = self.s.models()
        pending_victims = {v for m in models if m.status is ModelStatus.LOADING for v in m.victims}
        held = [m.name for m in models if m.status in HOLDING and m.name not in pending_victims]
        assert len(held) <= MAX_MODELS, f"{held} hold places (max_models {MAX_MODELS})"
        running = [p for p in self.procs.values() if p.state != "dead" and not p.hung]
        assert len(running) <= MAX_MODELS, f"{len(running)} workers run: {running}"

    @invariant()
    def scheduler_matches_the_world(self) -> None:
        for m in self.s.models():
            proc = self.procs.get((m.name, m.gen))
            if m.status is ModelStatus.LOADED:
                assert proc is not None and proc.state == "loaded", (m.name, m.status, proc)
            elif m.status is ModelStatus.LOADING and m.started:
                assert proc is not None and proc.state in ("loading", "dead"), (m.name, m.status, proc)
            elif m.status is ModelStatus.UNLOADING:
                # something will still be reported for its worker, or it waits forever
                assert proc is not None and (proc.state == "stopping" or not proc.load_reported), \
                    f"{m.name} is UNLOADING, but its worker (gen {m.gen}) will report nothing more: {proc}"

    @invariant()
    def waiters_add_up(self) -> None:
        assert self.s.idle == (not self.waiting and not self.serving)
        assert self.s.waiting == len(self.waiting)
        served = {w for m in self.s.models() for w in m.serving}
        assert served == set(self.serving)

    @invariant()
    def the_catalog_is_what_can_be_asked_for(self) -> None:
        for name in self.catalog:
            m = self.s.model(name)
            assert m is not None and not m.retired, f"{name} is configured but not servable"

    @invariant()
    def only_a_worker_with_an_old_entry_is_to_be_reloaded(self) -> None:
        for m in self.s.models():
            proc = self.procs.get((m.name, m.gen))
            if m.stale and m.started and proc is not None:
                assert proc.entry.worker != m.entry.worker, \
                    f"{m.name} (gen {m.gen}) runs its current entry, yet is to be reloaded once idle"

    # ---- the end: the world settles, every request ends ---------------------------------

    def teardown(self) -> None:
        for _ in range(200):
            if not (self.estimates or self.proc_list("loading", "dead", "stopping") or self.serving
                    or self.waiting):
                break
            while self.estimates:
                name = self.estimates.pop(0)
                self.feed("estimated", self.s.estimated(name, world_estimate(name)))
            for proc in self.proc_list("loading"):
                proc.load_reported, proc.state, proc.rss = True, "loaded", NEEDS[proc.name]
                self.feed("load_done", self.s.load_done(proc.name, proc.gen, self.now, proc.rss))
            for proc in self.proc_list("dead"):
                proc.load_reported = True
                self.feed("load_failed", self.s.load_failed(proc.name, proc.gen, self.now,
                                                            Failure("died while starting")))
                self._gone(proc)
            for proc in self.proc_list("stopping"):
                self._gone(proc)
                self.feed("worker_exited", self.s.worker_exited(proc.name, proc.gen, self.now, None))
            for waiter in sorted(self.serving):
                del self.serving[waiter]
                self.feed("release", self.s.release(waiter, self.now))
            self.now += 1.0
            self.feed("tick", self.s.tick(self.now))
        assert not self.waiting, f"requests never answered: {self.waiting}"
        assert self.s.idle


class FullWorldSchedulerMachine(SchedulerMachine):
    catalog_changes = True
    split_load_death = True


MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None,
                            report_multiple_bugs=False)
TestSchedulerRandomEvents = SchedulerMachine.TestCase
TestSchedulerRandomEvents.settings = MACHINE_SETTINGS
TestSchedulerRandomEventsFullWorld = FullWorldSchedulerMachine.TestCase
TestSchedulerRandomEventsFullWorld.settings = MACHINE_SETTINGS

