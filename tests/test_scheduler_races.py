"""The scheduler against interleavings of events (loads racing unloads, drains, stale
news, victims) and against changes of the catalog (a reload)."""

from __future__ import annotations

import pytest

from protocol.errors import ErrorKind
from router.admission import MIB
from router.catalog import Policy
from router.effects import Grant, Status, Stop
from router.modelstate import Failure, ModelStatus
from tests.schedsim import GRACE, Sim, entry, reasons, stops_in

# ---- interleavings ------------------------------------------------------------------


@pytest.mark.parametrize("late", ["done", "failed"])
def test_an_unload_racing_a_load_ignores_the_loads_late_outcome(late: str) -> None:
    sim = Sim("a")
    waiter = sim.request("a")
    gen = sim.loading["a"]
    assert stops_in(sim.unload("a")) == [Stop("a", gen, 0.0, "unloaded")]
    assert sim.denied(waiter).kind is ErrorKind.UNAVAILABLE
    if late == "done":  # the worker lives on until the stop takes it: nothing changes yet
        assert sim.s.load_done("a", gen, sim.now, 100 * MIB) == []
        assert sim.status("a") is ModelStatus.UNLOADING and sim.gen("a") == gen
        sim.exited("a")
    else:  # a failed load means its worker is gone: the stop is over
        assert sim.s.load_failed("a", gen, sim.now, Failure("stopped while loading")) == [Status("a")]
        assert sim.s.worker_exited("a", gen, sim.now, None) == []  # its exit is old news
    assert sim.status("a") is ModelStatus.UNLOADED
    m = sim.s.model("a")
    assert m is not None and m.failures == 0  # the stopped load was no failure
    again = sim.request("a")
    assert [s.gen for s in sim.starts("a")] == [gen, gen + 1]
    sim.done("a")
    assert sim.granted(again)


def test_a_stopping_model_first_in_line_does_not_block_a_later_model_that_fits() -> None:
    sim = Sim("old", "x", "y", max_models=2)
    sim.use("old")
    sim.use("x")
    sim.unload("x")  # x's worker takes its time to go
    x = sim.request("x")  # first in line, but x can only wait for its old worker
    y = sim.request("y")  # fits by evicting the idle "old"
    assert [s.reason for s in sim.stops("old")] == ["evicted for y"]
    sim.exited("old")
    sim.done("y")
    assert sim.granted(y) and sim.outcome(x) is None  # x waits for its old worker alone
    sim.exited("x")
    assert len(sim.starts("x")) == 2  # the places left by "old" and x's old worker: x loads
    sim.done("x")
    assert sim.granted(x)


def test_a_stopping_model_first_in_line_keeps_its_turn() -> None:
    # x's worker is being unloaded when a request for x comes; then one for y. The only
    # place is x's until its worker exits. Then x came first: strict FIFO gives it to x.
    sim = Sim("x", "y", max_models=1)
    sim.use("x")
    sim.unload("x")
    x = sim.request("x")
    y = sim.request("y")
    assert sim.started() == ["x"]  # nobody starts while x's worker still runs
    sim.exited("x")
    sim.settle()
    assert sim.granted(x), f"x came first, yet the place went to {sim.started()[1:]}"
    assert sim.outcome(y) is None


def test_drain_during_a_load_still_grants_its_waiters() -> None:
    sim = Sim("a")
    waiters = [sim.request("a"), sim.request("a")]
    sim.s.drain()
    late = sim.request("a")
    assert sim.denied(late).kind is ErrorKind.UNAVAILABLE
    sim.done("a")
    assert all(sim.granted(w) for w in waiters)
    assert not sim.s.idle
    for w in waiters:
        sim.release(w)
    assert sim.s.idle and sim.stops("a") == []


def test_cut_during_a_load_refuses_its_waiters_and_stops_it_at_once() -> None:
    sim = Sim("a", "b", "c", max_models=2)
    served = sim.hold("b")
    loading = sim.request("a")
    gen = sim.loading["a"]
    queued = sim.request("c")  # no place: b busy, a loading
    assert sim.outcome(queued) is None
    out = sim.s.cut()
    sim.feed(out)
    assert stops_in(out) == [Stop("a", gen, 0.0, "shutdown")]  # b serves on: only loads stop
    why = sim.denied(loading)
    assert why.kind is ErrorKind.UNAVAILABLE and "was loading and modelherd is shutting down" in why.message
    why = sim.denied(queued)
    assert "was waiting to load and modelherd is shutting down" in why.message
    assert sim.outcome(served) is not None and isinstance(sim.outcome(served), Grant)
    assert sim.denied(sim.request("b")).kind is ErrorKind.UNAVAILABLE
    assert sim.s.load_done("a", gen, sim.now, 0) == []  # the stopped load's late news
    sim.exited("a")
    assert sim.starts("c") == [] and sim.status("a") is ModelStatus.UNLOADED
    sim.release(served)
    assert sim.s.idle


def test_a_second_signal_cuts_a_drain_short_and_close_stops_the_rest() -> None:
    sim = Sim("a", "b")
    served = sim.hold("b")
    waiter = sim.request("a")
    gen_a = sim.loading["a"]
    sim.s.drain()
    assert sim.outcome(waiter) is None  # a drain lets those waiting go on waiting
    sim.feed(sim.s.cut())  # the second signal
    assert sim.denied(waiter).kind is ErrorKind.UNAVAILABLE
    assert sim.stops("a") == [Stop("a", gen_a, 0.0, "shutdown")] and sim.stops("b") == []
    gen_b = sim.running["b"]
    out = sim.s.close(3.0)
    sim.feed(out)
    assert stops_in(out) == [Stop("b", gen_b, 3.0, "shutdown")]  # a was stopped already
    assert sim.s.closed
    sim.release(served)
    sim.settle()
    assert sim.starts("a") == [sim.starts("a")[0]] and sim.starts("b") == [sim.starts("b")[0]]


def test_events_for_an_old_generation_are_ignored() -> None:
    sim = Sim("a")
    sim.use("a")
    old = sim.running["a"]
    sim.exited("a", Failure("crashed", -11))
    waiter = sim.request("a")
    new = sim.loading["a"]
    assert new != old
    stale = Failure("old news")
    assert sim.s.load_done("a", old, sim.now, 1) == []
    assert sim.s.load_failed("a", old, sim.now, stale) == []
    assert sim.s.worker_exited("a", old, sim.now, stale) == []
    assert sim.s.worker_hung("a", old, stale) == []
    assert sim.s.worker_exited("nope", 1, sim.now, stale) == []  # nor for a model nobody knows
    assert sim.status("a") is ModelStatus.LOADING and sim.gen("a") == new
    sim.done("a")
    assert sim.granted(waiter)
    assert sim.s.worker_hung("a", old, stale) == [] and sim.status("a") is ModelStatus.LOADED


def test_a_hung_worker_is_failed_and_stopped_without_grace() -> None:
    sim = Sim("a")
    held = sim.hold("a")
    gen = sim.running["a"]
    out = sim.feed(sim.s.worker_hung("a", gen, Failure("no heartbeat for 30 s")))
    assert stops_in(out) == [Stop("a", gen, 0.0, "no heartbeat for 30 s")]
    assert sim.status("a") is ModelStatus.FAILED
    sim.release(held)
    sim.exited("a")
    assert sim.status("a") is ModelStatus.FAILED
    waiter = sim.request("a")  # a failed worker is no failed load: no backoff
    sim.done("a")
    assert sim.granted(waiter)


def test_a_load_waits_for_all_its_victims_to_exit_before_it_starts() -> None:
    sim = Sim("a", "b", "c", memory=500 * MIB, needs={"a": 200 * MIB, "b": 200 * MIB, "c": 400 * MIB})
    sim.use("a")
    sim.use("b")
    waiter = sim.request("c")  # needs both gone
    assert [s.reason for s in sim.stops("a") + sim.stops("b")] == ["evicted for c", "evicted for c"]
    assert sim.status("c") is ModelStatus.LOADING and sim.starts("c") == []  # its place is held
    sim.exited("b")
    assert sim.starts("c") == []
    sim.exited("a")
    assert [s.gen for s in sim.starts("c")] == [sim.gen("c")]
    sim.done("c")
    assert sim.granted(waiter)


def test_unloading_a_load_that_waits_for_its_victims_cancels_it() -> None:
    sim = Sim("a", "b", max_models=1)
    sim.use("a")
    waiter = sim.request("b")
    assert sim.status("b") is ModelStatus.LOADING and sim.starts("b") == []
    out = sim.unload("b")
    assert stops_in(out) == []  # no worker to stop yet
    assert sim.status("b") is ModelStatus.UNLOADED and sim.denied(waiter).kind is ErrorKind.UNAVAILABLE
    sim.exited("a")  # the victim goes on stopping; nothing starts when it is gone
    assert sim.starts("b") == [] and sim.status("a") is ModelStatus.UNLOADED


def test_a_request_for_a_victim_reloads_it_after_its_exit() -> None:
    sim = Sim("a", "b", max_models=1)
    sim.use("a")
    b = sim.request("b")  # evicts a
    a = sim.request("a")  # a is on its way out: it waits
    sim.exited("a")
    sim.done("b")
    assert sim.granted(b) and sim.outcome(a) is None
    sim.release(b)
    sim.settle()
    assert sim.granted(a) and [s.model for s in sim.starts()] == ["a", "b", "a"]


# ---- the catalog changes ----------------------------------------------------------


def test_a_new_model_appears() -> None:
    sim = Sim("a")
    out = sim.feed(sim.s.update_catalog([entry("a"), entry("n")], sim.now))
    assert Status("n") in out and Status("a") not in out  # a did not change
    waiter = sim.request("n")
    sim.done("n")
    assert sim.granted(waiter)


def test_a_removed_idle_model_is_stopped_then_forgotten() -> None:
    sim = Sim("a", "b", "u")
    sim.use("a")
    waiter = sim.request("b")  # loading: its waiter is told the model is gone
    gen_b = sim.loading["b"]
    out = sim.feed(sim.s.update_catalog([], sim.now))
    assert Stop("a", sim.stops("a")[0].gen, GRACE, "removed from the configuration") in out
    assert Stop("b", gen_b, 0.0, "removed from the configuration") in out
    why = sim.denied(waiter)
    assert why.kind is ErrorKind.NOT_FOUND and "removed from the configuration" in why.message
    assert sim.s.model("u") is None  # never loaded: forgotten at once
    assert sim.s.model("a") is not None  # until its worker is gone
    sim.exited("a")
    sim.exited("b")
    assert sim.s.models() == []


def test_a_removed_busy_model_stops_only_when_released() -> None:
    sim = Sim("a")
    held = sim.hold("a")
    out = sim.feed(sim.s.update_catalog([], sim.now))
    assert stops_in(out) == []
    assert sim.denied(sim.request("a")).kind is ErrorKind.NOT_FOUND
    out = sim.release(held)
    assert reasons(out) == ["removed from the configuration"]
    sim.exited("a")
    assert sim.s.model("a") is None


def test_a_changed_model_reloads_once_idle() -> None:
    sim = Sim("a", "b")
    held = sim.hold("a")
    sim.use("b")
    changed = [entry("a", n_ctx=4096), entry("b", policy=Policy(ttl=60))]  # b: its policy only
    out = sim.feed(sim.s.update_catalog(changed, sim.now))
    assert stops_in(out) == [] and Status("a") in out and Status("b") in out
    out = sim.release(held)
    assert reasons(out) == ["its configuration changed"]
    sim.exited("a")
    waiter = sim.request("a")
    m = sim.s.model("a")
    assert m is not None and m.entry.worker.n_ctx == 4096 and len(sim.starts("a")) == 2
    assert sim.estimates == ["a", "b", "a"]  # the new entry is estimated afresh
    sim.done("a")
    assert sim.granted(waiter)
    sim.release(waiter)
    assert len(sim.stops("a")) == 1 and sim.stops("b") == []  # reloaded once, b never


def test_a_changed_loading_model_is_reloaded_after_its_load() -> None:
    sim = Sim("a")
    waiter = sim.request("a")
    sim.feed(sim.s.update_catalog([entry("a", n_ctx=4096)], sim.now))
    sim.done("a")  # the worker loaded the old entry: it serves, then goes once idle
    assert sim.granted(waiter) and sim.stops("a") == []
    out = sim.release(waiter)
    assert reasons(out) == ["its configuration changed"]


def test_a_model_removed_and_added_back_stays_available() -> None:
    # A reload removes model a while it serves, a second reload brings it back. a is in
    # the configuration: it must stay known and servable, and not be forgotten when its
    # old worker exits.
    sim = Sim("a")
    held = sim.hold("a")
    sim.feed(sim.s.update_catalog([], sim.now))
    sim.feed(sim.s.update_catalog([entry("a")], sim.now))
    why = sim.outcome(sim.request("a"))
    assert isinstance(why, Grant), f"a is configured again, yet: {why}"
    sim.release(held)
    sim.settle()
    assert sim.s.model("a") is not None, "a is configured, yet the scheduler forgot it"


def test_a_removed_model_is_forgotten_only_once_its_requests_end() -> None:
    # "removed ones are unloaded once idle, then forgotten": a removed model whose worker
    # crashed (FAILED, holding no place) still has a request in `serving`. Forgetting it
    # then leaves that request pointing at a model the scheduler no longer has; when the
    # request ends, `_forget` pops the model *by name*, so had the model been configured
    # again meanwhile, the new one would be dropped (see the second half).
    sim = Sim("a")
    held = sim.hold("a")
    sim.exited("a", Failure("crashed", -11))
    sim.feed(sim.s.update_catalog([], sim.now))
    m = sim.s.model("a")
    assert m is not None and held in m.serving, "a removed model was forgotten while still serving"
    sim.release(held)
    assert sim.s.model("a") is None  # now it may go


def test_a_request_ending_on_a_forgotten_model_does_not_drop_its_successor() -> None:
    sim = Sim("a")
    held = sim.hold("a")
    sim.exited("a", Failure("crashed", -11))
    sim.feed(sim.s.update_catalog([], sim.now))  # a crashed, removed while serving
    sim.feed(sim.s.update_catalog([entry("a")], sim.now))  # and configured again
    assert sim.s.model("a") is not None
    sim.release(held)  # the old request ends
    assert sim.s.model("a") is not None, "configured model a was dropped when an old request ended"


def test_a_changed_model_whose_worker_crashed_is_not_reloaded_again() -> None:
    # a's entry changes while it serves, so it is to be reloaded once idle; but its worker
    # crashes first, and the next request loads the new entry. That worker runs the
    # current configuration: nothing calls for stopping it once it is idle.
    sim = Sim("a")
    held = sim.hold("a")
    sim.feed(sim.s.update_catalog([entry("a", n_ctx=4096)], sim.now))
    sim.exited("a", Failure("crashed", -11))
    sim.release(held)
    waiter = sim.request("a")
    m = sim.s.model("a")
    assert m is not None and m.entry.worker.n_ctx == 4096
    sim.done("a")
    assert sim.granted(waiter)
    out = sim.release(waiter)
    assert stops_in(out) == [], f"a worker with the current entry is stopped: {stops_in(out)}"


def test_a_changed_model_still_waiting_for_its_victims_is_not_reloaded_after_its_load() -> None:
    # a's entry changes while a waits for its victim to exit: its worker is not started
    # yet, so it will start with the new entry, and must not be stopped for a change.
    sim = Sim("a", "v", max_models=1)
    sim.use("v")
    waiter = sim.request("a")
    assert sim.starts("a") == []
    sim.feed(sim.s.update_catalog([entry("a", n_ctx=4096), entry("v")], sim.now))
    sim.exited("v")
    assert len(sim.starts("a")) == 1
    m = sim.s.model("a")
    assert m is not None and m.entry.worker.n_ctx == 4096  # what the pool starts the worker with
    sim.done("a")
    assert sim.granted(waiter)
    out = sim.release(waiter)
    assert stops_in(out) == [], f"a worker started with the current entry is stopped: {stops_in(out)}"


def test_a_crash_during_a_load_then_an_unload_leaves_the_model_unloaded() -> None:
    # The pool hears a loading worker's exit first (ignored: "its load reports the
    # outcome") and its load's failure a turn later. An unload in between moves the model
    # to UNLOADING, so the load's failure is ignored too. No further news ever comes for
    # that worker: the model must not stay UNLOADING (holding a place, its next requests
    # waiting forever).
    sim = Sim("a", "b", max_models=1)
    sim.request("a")
    gen = sim.loading.pop("a")
    assert sim.s.worker_exited("a", gen, sim.now, Failure("died while starting", -9)) == []
    sim.feed(sim.s.unload("a", sim.now))  # Stop for a worker that is gone: the pool finds none to stop
    sim.feed(sim.s.load_failed("a", gen, sim.now, Failure("died while starting", -9)))
    sim.stopping.pop("a", None)  # no exit will come: it was reported already
    assert sim.status("a") in (ModelStatus.UNLOADED, ModelStatus.FAILED), sim.status("a")
    waiter = sim.request("a")
    sim.settle()
    assert sim.granted(waiter)


