"""The scheduler as a pure state machine: scripted events in, effects out (admission,
time, memory, bounds and failures). No event loop, no processes, no clock: time is a
number the test moves, memory a probe the test sets."""

from __future__ import annotations

import logging

import pytest

from protocol.errors import ErrorKind
from router.admission import MIB
from router.catalog import Policy
from router.effects import Deny, Grant, Log, StartLoad, Stop
from router.modelstate import Failure, ModelStatus
from tests.schedsim import GRACE, Sim, stops_in

# ---- eviction and admission order --------------------------------------------------


def test_lru_idle_model_is_evicted_for_a_third() -> None:
    sim = Sim("a", "b", "c", max_models=2)
    sim.use("a")
    sim.use("b")
    sim.use("a")  # b is now the least recently used
    sim.use("c")
    assert sim.started() == ["a", "b", "c"]
    assert [(s.model, s.grace, s.reason) for s in sim.stops("b")] == [("b", GRACE, "evicted for c")]
    assert sim.stops("a") == []
    assert [sim.status(n) for n in "abc"] == [ModelStatus.LOADED, ModelStatus.UNLOADED, ModelStatus.LOADED]


def test_busy_model_is_never_evicted_and_the_waiter_is_granted_once_it_is_idle() -> None:
    sim = Sim("a", "b", max_models=1)
    held = sim.hold("a")
    waiter = sim.request("b")
    assert sim.outcome(waiter) is None and sim.stops("a") == [] and sim.started() == ["a"]
    assert "waiting for one of a to become idle" in (sim.wait_reason("b") or "")
    sim.release(held)
    assert [s.reason for s in sim.stops("a")] == ["evicted for b"]
    assert sim.started() == ["a"]  # b starts only once a's worker is gone
    sim.exited("a")
    assert sim.started() == ["a", "b"]
    sim.done("b")
    assert sim.granted(waiter)


def test_waiters_are_admitted_in_arrival_order() -> None:
    sim = Sim("a", "b", "c", "d", max_models=2)
    a, b = sim.hold("a"), sim.hold("b")
    c = sim.request("c")
    assert sim.wait_reason("c") is not None
    d = sim.request("d")
    assert any(isinstance(e, Log) and "d waits to load behind c" in e.message for e in sim.out)
    sim.release(b)  # one place frees: it goes to c, who came first, not d
    sim.settle()
    assert sim.granted(c) and sim.outcome(d) is None
    assert sim.started() == ["a", "b", "c"]
    sim.release(a)
    sim.settle()
    assert sim.granted(d) and sim.started() == ["a", "b", "c", "d"]


def test_strict_fifo_a_later_model_that_would_fit_does_not_overtake() -> None:
    sim = Sim("a", "big", "small", memory=400 * MIB,
              needs={"a": 200 * MIB, "big": 300 * MIB, "small": 100 * MIB})
    held = sim.hold("a")
    big = sim.request("big")  # needs a's memory: waits for a
    assert "memory is short" in (sim.wait_reason("big") or "")
    small = sim.request("small")  # would fit now, but came later
    assert sim.started() == ["a"] and sim.wait_reason("small") is None
    sim.release(held)  # a goes; big is admitted first
    sim.exited("a")
    assert sim.started() == ["a", "big", "small"]
    sim.settle()
    assert sim.granted(big) and sim.granted(small)


def test_waiters_for_one_model_share_one_eviction_and_one_load() -> None:
    sim = Sim("a", "b", max_models=1)
    held = sim.hold("a")
    waiters = [sim.request("b") for _ in range(5)]
    assert sim.estimates == ["a", "b"]
    sim.release(held)
    sim.settle()
    assert all(sim.granted(w) for w in waiters)
    assert len(sim.stops("a")) == 1 and len(sim.starts("b")) == 1
    assert {e.gen for e in sim.effects if isinstance(e, Grant) and e.model == "b"} \
        == {sim.starts("b")[0].gen}


def test_concurrent_first_requests_start_exactly_one_load() -> None:
    sim = Sim("a", answer_estimates=False)
    waiters = [sim.request("a") for _ in range(8)]
    assert sim.estimates == ["a"] and sim.starts() == []  # one estimate for all of them
    sim.feed(sim.s.estimated("a", sim.estimate("a")))
    assert len(sim.starts("a")) == 1
    more = [sim.request("a") for _ in range(3)]  # while it loads: they join the load
    assert len(sim.starts("a")) == 1 and sim.estimates == ["a"]
    sim.done("a")
    assert all(sim.granted(w) for w in waiters + more)
    m = sim.s.model("a")
    assert m is not None and len(m.serving) == 11


def test_a_waiter_leaving_the_queue_affects_nothing_else() -> None:
    sim = Sim("a", "b", "c", max_models=1)
    held = sim.hold("a")
    b, c = sim.request("b"), sim.request("c")
    out = sim.cancel(b)  # b's client disconnects while queued ahead of c
    assert sim.outcome(b) is None  # a waiter that left is told nothing
    assert any(isinstance(e, Log) and "b left the load queue" in e.message for e in out)
    assert not any(isinstance(e, Stop | StartLoad | Deny | Grant) for e in out)
    m = sim.s.model("b")
    assert m is not None and not m.queued and m.waiters == []
    sim.release(held)
    sim.settle()
    assert sim.granted(c) and sim.started() == ["a", "c"]  # b was never loaded
    assert not sim.s.idle
    sim.release(c)
    assert sim.s.idle


def test_one_waiter_leaving_keeps_the_load_for_the_others() -> None:
    sim = Sim("a", "b", max_models=1)
    held = sim.hold("a")
    first, second = sim.request("b"), sim.request("b")
    sim.cancel(first)
    m = sim.s.model("b")
    assert m is not None and m.queued and m.waiters == [second]
    sim.release(held)
    sim.settle()
    assert sim.granted(second) and sim.outcome(first) is None


# ---- time -----------------------------------------------------------------------


def test_idle_ttl_unloads_through_tick_and_next_deadline() -> None:
    sim = Sim("a", policies={"a": Policy(ttl=30)})
    assert sim.s.next_deadline(sim.now) is None
    sim.use("a")  # released at 100; now 101
    assert sim.s.next_deadline(sim.now) == pytest.approx(130)
    assert stops_in(sim.tick(129)) == [] and sim.status("a") is ModelStatus.LOADED
    held = sim.hold("a")  # one being served is never idle, however long it runs
    assert sim.s.next_deadline(sim.now) is None
    assert stops_in(sim.tick(1000)) == []
    sim.release(held)  # at 1000
    assert sim.s.next_deadline(sim.now) == pytest.approx(1030)
    out = sim.tick(1030)
    assert stops_in(out) == [Stop("a", sim.stops("a")[0].gen, GRACE, "idle")]
    assert sim.status("a") is ModelStatus.UNLOADING and sim.s.next_deadline(sim.now) is None
    sim.exited("a")
    assert sim.status("a") is ModelStatus.UNLOADED
    sim.use("a")
    assert len(sim.starts("a")) == 2 and sim.status("a") is ModelStatus.LOADED


def test_pinned_model_is_never_evicted_nor_reaped() -> None:
    sim = Sim("p", "a", "b", max_models=2, policies={"p": Policy(pinned=True, ttl=1)})
    sim.use("p")  # least recently used, but pinned
    sim.use("a")
    sim.use("b")
    assert sim.stops("p") == [] and [s.reason for s in sim.stops("a")] == ["evicted for b"]
    assert sim.s.next_deadline(sim.now) is None
    sim.tick(sim.now + 1000)
    assert sim.stops("p") == [] and sim.status("p") is ModelStatus.LOADED


def test_pinned_models_filling_every_place_refuse_at_once() -> None:
    sim = Sim("p", "a", max_models=1, policies={"p": Policy(pinned=True)})
    sim.use("p")
    waiter = sim.request("a")
    why = sim.denied(waiter)  # in the request's own effects: nobody waits for nothing
    assert any(isinstance(e, Deny) for e in sim.out)
    assert why.kind is ErrorKind.UNAVAILABLE and "held by pinned models" in why.message
    assert sim.starts("a") == [] and sim.stops("p") == []
    assert sim.s.idle


# ---- memory -----------------------------------------------------------------------


def test_memory_admission_evicts_idle_models_until_it_fits() -> None:
    sim = Sim("a", "b", "c", memory=450 * MIB, need=200 * MIB)
    sim.use("a")
    sim.use("b")  # 50 MiB left: c needs a and only a to go
    sim.use("c")
    assert [s.reason for s in sim.stops("a")] == ["evicted for c"] and sim.stops("b") == []


def test_memory_admission_refuses_what_cannot_fit_with_the_numbers() -> None:
    sim = Sim("a", memory=150 * MIB, need=200 * MIB)
    why = sim.denied(sim.request("a"))
    assert why.kind is ErrorKind.UNAVAILABLE and sim.starts() == []
    assert "does not fit in memory: it needs about 200 MiB" in why.message
    assert "150 MiB is available" in why.message


def test_loading_models_reserve_their_memory() -> None:
    # Free memory does not drop until a load has happened: two loads at once must not
    # both count on the same free bytes.
    sim = Sim("a", "b", memory=300 * MIB, need=200 * MIB)
    a = sim.request("a")
    assert sim.started() == ["a"] and sim.probe.available() == 300 * MIB  # nothing touched yet
    b = sim.request("b")
    assert sim.started() == ["a"] and "memory is short" in (sim.wait_reason("b") or "")
    sim.done("a")
    assert sim.granted(a) and sim.started() == ["a"]  # a is busy: b still waits
    sim.release(a)
    assert [s.reason for s in sim.stops("a")] == ["evicted for b"]
    sim.settle()
    assert sim.granted(b) and sim.started() == ["a", "b"]


def test_a_measured_rss_above_the_estimate_counts() -> None:
    sim = Sim("a", "b", memory=500 * MIB, need=100 * MIB)
    held = sim.request("a")
    sim.done("a", rss=450 * MIB)  # far more than estimated
    b = sim.request("b")
    assert sim.outcome(b) is None and "memory is short" in (sim.wait_reason("b") or "")
    sim.release(held)
    sim.settle()
    assert sim.granted(b) and [s.reason for s in sim.stops("a")] == ["evicted for b"]


# ---- bounds ----------------------------------------------------------------------


def test_per_model_max_queue_is_429_and_global_max_waiting_is_503() -> None:
    sim = Sim("a", "b", max_waiting=2, policies={"a": Policy(max_queue=2)})
    first, second = sim.request("a"), sim.request("a")
    assert len(sim.starts("a")) == 1
    why = sim.denied(sim.request("a"))
    assert why.kind is ErrorKind.RATE_LIMITED and "max_queue 2" in why.message
    why = sim.denied(sim.request("b"))
    assert why.kind is ErrorKind.UNAVAILABLE and "max_waiting 2" in why.message
    why = sim.denied(sim.load("a"))  # an operator's load skips max_queue, not max_waiting
    assert why.kind is ErrorKind.UNAVAILABLE and "max_waiting 2" in why.message
    sim.done("a")
    assert sim.granted(first) and sim.granted(second)
    why = sim.denied(sim.request("a"))  # those served count against max_queue too
    assert why.kind is ErrorKind.RATE_LIMITED
    sim.release(first)
    assert sim.granted(sim.request("a"))


def test_autoload_off_refuses_an_unloaded_model_but_joins_a_load() -> None:
    sim = Sim("a")
    why = sim.denied(sim.request("a", autoload=False))
    assert why.kind is ErrorKind.MODEL_NOT_LOADED and sim.starts() == []
    first = sim.request("a")
    joined = sim.request("a", autoload=False)  # it is loading: no reason to refuse
    sim.done("a")
    assert sim.granted(first) and sim.granted(joined)


# ---- failures -------------------------------------------------------------------


def test_a_failed_load_backs_off_and_the_backoff_doubles() -> None:
    sim = Sim("bad")
    first = sim.request("bad")
    sim.fail("bad", "corrupt weights")
    why = sim.denied(first)
    assert why.kind is ErrorKind.LOAD_FAILED and why.retry_after == 5 and "corrupt weights" in why.message
    assert sim.status("bad") is ModelStatus.FAILED
    sim.now += 1
    why = sim.denied(sim.request("bad"))  # within the backoff: answered without a new worker
    assert why.kind is ErrorKind.LOAD_FAILED and why.retry_after == 4
    assert "failed to load 1 time(s) in a row" in why.message and "corrupt weights" in why.message
    assert len(sim.starts("bad")) == 1 and sim.estimates == ["bad"]
    sim.now += 4
    again = sim.request("bad")
    assert len(sim.starts("bad")) == 2 and sim.estimates == ["bad", "bad"]
    sim.fail("bad")
    assert sim.denied(again).retry_after == 10
    sim.now += 1
    explicit = sim.load("bad")  # an operator's load skips the backoff
    assert len(sim.starts("bad")) == 3
    sim.done("bad")
    assert sim.granted(explicit)
    m = sim.s.model("bad")
    assert m is not None and m.failures == 0 and m.failure is None


def test_a_crash_after_loading_marks_failed_and_the_next_request_loads_again() -> None:
    sim = Sim("a")
    sim.use("a")
    out = sim.exited("a", Failure("worker exited unexpectedly (killed by SIGKILL)", -9))
    assert sim.status("a") is ModelStatus.FAILED
    assert any(isinstance(e, Log) and e.level == logging.ERROR and "SIGKILL" in e.message for e in out)
    assert not any(isinstance(e, StartLoad) for e in out)  # nobody asked for it yet
    waiter = sim.request("a")  # no backoff for a crash
    assert len(sim.starts("a")) == 2
    sim.done("a")
    assert sim.granted(waiter) and sim.status("a") is ModelStatus.LOADED


def test_unload_refuses_queued_waiters_with_503() -> None:
    sim = Sim("a", "b", max_models=1)
    held = sim.hold("a")
    waiter = sim.request("b")
    sim.unload("b")
    why = sim.denied(waiter)
    assert why.kind is ErrorKind.UNAVAILABLE and "was waiting to load and it was unloaded" in why.message
    m = sim.s.model("b")
    assert m is not None and not m.queued
    sim.release(held)
    assert sim.stops("a") == [] and sim.started() == ["a"]  # nothing waits for a place any more


def test_draining_refuses_new_requests_and_serves_those_in_flight() -> None:
    sim = Sim("a")
    held = sim.hold("a")
    sim.s.drain()
    assert not sim.s.idle
    why = sim.denied(sim.request("a"))
    assert why.kind is ErrorKind.UNAVAILABLE and "shutting down" in why.message
    assert sim.denied(sim.load("a")).kind is ErrorKind.UNAVAILABLE
    sim.release(held)
    assert sim.s.idle and sim.stops("a") == []


def test_a_model_still_stopping_holds_up_nobody_behind_it() -> None:
    sim = Sim("x", "y")
    sim.use("x")
    sim.unload("x")
    assert sim.status("x") is ModelStatus.UNLOADING
    again = sim.request("x")  # waits for x's old worker to go
    y = sim.request("y")  # room for y: it must not wait behind x
    assert sim.started() == ["x", "y"]
    sim.done("y")
    assert sim.granted(y) and sim.outcome(again) is None
    sim.exited("x")  # the old worker is gone: x loads again for its waiter
    assert len(sim.starts("x")) == 2
    sim.done("x")
    assert sim.granted(again)


def test_a_worker_dying_right_after_ready_is_a_failed_load_and_frees_its_place() -> None:
    sim = Sim("a", "b", max_models=1)
    first = sim.request("a")
    gen = sim.loading["a"]
    # The pool hears the exit first (it is ignored: the load reports the outcome)...
    assert sim.s.worker_exited("a", gen, sim.now, Failure("worker exited unexpectedly", -9)) == []
    assert sim.status("a") is ModelStatus.LOADING
    sim.fail("a", "the worker exited right after loading (killed by SIGKILL)")  # ...then the load
    why = sim.denied(first)
    assert why.kind is ErrorKind.LOAD_FAILED and "right after loading" in why.message
    assert sim.status("a") is ModelStatus.FAILED
    b = sim.request("b")  # a holds no place any more
    assert sim.started() == ["a", "b"] and sim.stops("a") == []
    sim.done("b")
    assert sim.granted(b)


def test_a_loading_model_is_stopped_at_once() -> None:
    sim = Sim("a")
    waiter = sim.request("a")
    gen = sim.loading["a"]
    out = sim.unload("a")
    assert stops_in(out) == [Stop("a", gen, 0.0, "unloaded")]  # no grace for a load
    why = sim.denied(waiter)
    assert why.kind is ErrorKind.UNAVAILABLE and "was loading and it was unloaded" in why.message


def test_unload_clears_the_backoff() -> None:
    sim = Sim("bad")
    sim.request("bad")
    sim.fail("bad")
    sim.unload("bad")
    assert sim.status("bad") is ModelStatus.UNLOADED
    waiter = sim.request("bad")  # no backoff left: a fresh worker at once
    assert len(sim.starts("bad")) == 2
    sim.done("bad")
    assert sim.granted(waiter)


def test_an_estimate_that_fails_is_no_error_and_is_made_again_next_load() -> None:
    sim = Sim("a")
    sim.estimate_fails = True
    sim.use("a")  # loads on what it knows (nothing) alone
    sim.unload("a")
    sim.exited("a")
    sim.estimate_fails = False
    sim.use("a")
    assert sim.estimates == ["a", "a"]  # the failure was not taken for an answer
    m = sim.s.model("a")
    assert m is not None and m.estimate == sim.estimate("a")


def test_a_late_estimate_for_a_model_nobody_waits_for_any_more_is_harmless() -> None:
    sim = Sim("a", answer_estimates=False)
    waiter = sim.request("a")
    sim.cancel(waiter)
    assert sim.feed(sim.s.estimated("a", sim.estimate("a"))) == []
    assert sim.starts() == [] and sim.s.idle
    assert sim.feed(sim.s.estimated("a", sim.estimate("a"))) == []  # twice: still nothing
    again = sim.request("a")  # the estimate is kept for the coming load
    assert sim.estimates == ["a"] and len(sim.starts("a")) == 1
    sim.done("a")
    assert sim.granted(again)


