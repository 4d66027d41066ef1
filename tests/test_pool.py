"""The pool's scheduling against fake effects: deterministic, no processes, no clock."""

from __future__ import annotations

import asyncio

import pytest

from protocol.errors import ErrorKind
from router.admission import MIB
from router.catalog import Policy
from router.slots import PoolError
from router.supervisor import WorkerStartError
from tests.fakepool import INFO, Harness, run, tick, until


async def _use(h: Harness, name: str) -> None:
    """One request that completes at once, and then time moves on."""
    async with h.pool.lease(name, autoload=True):
        pass
    h.clock.now += 1


def test_lru_idle_model_is_evicted_for_a_third() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", "c", max_models=2)
        await _use(h, "a")
        await _use(h, "b")
        await _use(h, "a")  # b is now the least recently used
        await _use(h, "c")
        assert h.names() == ["a", "b", "c"]
        b = h.launched[1]
        assert b.stops == [7.0]  # by the ladder, with stop_timeout's grace
        assert [h.status(n) for n in "abc"] == ["loaded", "unloaded", "loaded"]
    run(scenario)


def test_busy_model_is_not_evicted_and_the_waiter_is_served_when_it_is_idle() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_models=1)
        held = h.hold("a")
        await held.leased.wait()
        waiter = h.hold("b")
        slot_b = h.pool.slot("b")
        assert slot_b is not None
        await until(lambda: slot_b.wait_reason is not None, "b queued")
        assert "waiting for one of a to become idle" in slot_b.wait_reason
        assert h.names() == ["a"] and h.launched[0].stops == []
        held.release()
        await waiter.leased.wait()
        assert h.names() == ["a", "b"] and h.launched[0].stops == [7.0]
        waiter.release()
        await asyncio.gather(held.task, waiter.task)
    run(scenario)


def test_waiters_are_admitted_in_arrival_order() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", "c", "d", max_models=2)
        a, b = h.hold("a"), h.hold("b")
        await a.leased.wait()
        await b.leased.wait()
        c = h.hold("c")
        await until(lambda: h.pool.slot("c").wait_reason is not None, "c queued")  # type: ignore[union-attr]
        d = h.hold("d")
        await until(lambda: h.pool.slot("d").admission is not None, "d queued")  # type: ignore[union-attr]
        b.release()  # one place frees: it goes to c, who came first, not d
        await c.leased.wait()
        assert h.names() == ["a", "b", "c"] and not d.leased.is_set()
        a.release()
        await d.leased.wait()
        assert h.names() == ["a", "b", "c", "d"]
        c.release()
        d.release()
        await asyncio.gather(a.task, b.task, c.task, d.task)
    run(scenario)


def test_waiters_for_one_model_share_one_eviction_and_one_load() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_models=1)
        held = h.hold("a")
        await held.leased.wait()
        waiters = [h.hold("b") for _ in range(5)]
        await until(lambda: h.pool.slot("b").admission_waiters == 5, "all queued")  # type: ignore[union-attr]
        held.release()
        for w in waiters:
            await w.leased.wait()
        assert h.names() == ["a", "b"]
        assert h.launched[0].stops == [7.0]
        for w in waiters:
            w.release()
        await asyncio.gather(held.task, *(w.task for w in waiters))
    run(scenario)


def test_concurrent_first_requests_start_exactly_one_load() -> None:
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        waiters = [h.hold("a") for _ in range(8)]
        await until(lambda: len(h.launched) == 1 and h.pool.slot("a").waiting == 8, "load")  # type: ignore[union-attr]
        h.launched[0].ready.set_result(INFO)
        for w in waiters:
            await w.leased.wait()
            w.release()
        await asyncio.gather(*(w.task for w in waiters))
        assert len(h.launched) == 1
    run(scenario)


def test_a_client_leaving_the_queue_affects_nothing_else() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", "c", max_models=1)
        held = h.hold("a")
        await held.leased.wait()
        b, c = h.hold("b"), h.hold("c")
        await until(lambda: h.pool.slot("c").admission is not None, "c queued")  # type: ignore[union-attr]
        b.task.cancel()  # b's client disconnects while queued ahead of c
        with pytest.raises(asyncio.CancelledError):
            await b.task
        assert h.pool.slot("b").admission is None  # type: ignore[union-attr]
        held.release()
        await c.leased.wait()
        assert h.names() == ["a", "c"]  # b was never loaded
        assert h.pool.slot("b").in_flight == 0 and h.pool.idle is False  # type: ignore[union-attr]
        c.release()
        await asyncio.gather(held.task, c.task)
        assert h.pool.idle
    run(scenario)


def test_idle_ttl_unloads_and_the_next_request_reloads() -> None:
    async def scenario() -> None:
        h = Harness("a", policies={"a": Policy(ttl=30)})
        await _use(h, "a")
        assert h.pool.reap_idle(h.clock.now) == pytest.approx(h.clock.now - 1 + 30)
        h.clock.now += 28
        assert h.pool.reap_idle(h.clock.now) is not None and h.status("a") == "loaded"
        held = h.hold("a")  # in flight is never idle, however long it runs
        await held.leased.wait()
        h.clock.now += 100
        assert h.pool.reap_idle(h.clock.now) is None and h.status("a") == "loaded"
        held.release()
        await held.task
        h.clock.now += 31
        h.pool.reap_idle(h.clock.now)
        await until(lambda: h.status("a") == "unloaded", "idle unload")
        assert h.launched[0].stops == [7.0]
        await _use(h, "a")
        assert len(h.launched) == 2 and h.status("a") == "loaded"
    run(scenario)


def test_pinned_model_is_never_evicted_nor_idle_unloaded() -> None:
    async def scenario() -> None:
        h = Harness("p", "a", "b", max_models=2, policies={"p": Policy(pinned=True, ttl=1)})
        await _use(h, "p")  # least recently used, but pinned
        await _use(h, "a")
        await _use(h, "b")
        assert h.launched[0].stops == [] and h.launched[1].stops == [7.0]
        h.clock.now += 1000
        h.pool.reap_idle(h.clock.now)
        assert h.status("p") == "loaded"
    run(scenario)


def test_pinned_models_filling_every_place_refuse_at_once() -> None:
    async def scenario() -> None:
        h = Harness("p", "a", max_models=1, policies={"p": Policy(pinned=True)})
        await _use(h, "p")
        with pytest.raises(PoolError) as err:
            await _use(h, "a")
        assert err.value.kind is ErrorKind.UNAVAILABLE
        assert "held by pinned models" in err.value.message
    run(scenario)


def test_memory_admission_evicts_idle_models_until_it_fits() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", "c", memory=450 * MIB, need=200 * MIB)
        await _use(h, "a")
        await _use(h, "b")  # 50 MiB left: c needs a and only a to go
        await _use(h, "c")
        assert h.launched[0].stops == [7.0] and h.launched[1].stops == []
    run(scenario)


def test_memory_admission_refuses_what_cannot_fit_with_the_numbers() -> None:
    async def scenario() -> None:
        h = Harness("a", memory=150 * MIB, need=200 * MIB)
        with pytest.raises(PoolError) as err:
            await _use(h, "a")
        assert err.value.kind is ErrorKind.UNAVAILABLE and h.launched == []
        assert "does not fit in memory: it needs about 200 MiB" in err.value.message
        assert "150 MiB is available" in err.value.message
    run(scenario)


def test_loading_models_reserve_their_memory() -> None:
    async def scenario() -> None:
        # Free memory does not drop until a load has happened: two loads at once must not
        # both count on the same free bytes.
        h = Harness("a", "b", memory=300 * MIB, need=200 * MIB, auto_ready=False)
        h.launched.clear()
        a = h.hold("a")
        await until(lambda: len(h.launched) == 1, "a loading")
        h.launched[0].rss = h.launched[0].mapped = 0  # nothing touched yet
        b = h.hold("b")
        await until(lambda: h.pool.slot("b").wait_reason is not None, "b waits")  # type: ignore[union-attr]
        assert "memory is short" in h.pool.slot("b").wait_reason  # type: ignore[union-attr,operator]
        h.launched[0].ready.set_result(INFO)
        await a.leased.wait()
        a.release()
        await until(lambda: len(h.launched) == 2, "b admitted after a is idle")
        h.launched[1].ready.set_result(INFO)
        await b.leased.wait()
        b.release()
        await asyncio.gather(a.task, b.task)
    run(scenario)


def test_per_model_queue_bound_is_429_and_global_waiting_bound_is_503() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_waiting=2, auto_ready=False, policies={"a": Policy(max_queue=2)})
        first, second = h.hold("a"), h.hold("a")
        await until(lambda: h.pool.slot("a").waiting == 2 and len(h.launched) == 1,  # type: ignore[union-attr]
                    "two waiting for one load")
        with pytest.raises(PoolError) as err:
            await _use(h, "a")
        assert err.value.kind is ErrorKind.RATE_LIMITED and "max_queue 2" in err.value.message
        with pytest.raises(PoolError) as err:
            await _use(h, "b")
        assert err.value.kind is ErrorKind.UNAVAILABLE and "max_waiting 2" in err.value.message
        h.launched[0].ready.set_result(INFO)
        for held in (first, second):
            await held.leased.wait()
            held.release()
        await asyncio.gather(first.task, second.task)
    run(scenario)


def test_a_model_failing_to_load_backs_off() -> None:
    async def scenario() -> None:
        h = Harness("bad", auto_ready=False)

        async def attempt() -> PoolError:
            task = asyncio.create_task(_use(h, "bad"))
            await until(lambda: len(h.launched) > attempts or task.done(), "attempt")
            if not task.done():
                h.launched[-1].ready.set_exception(WorkerStartError("corrupt weights"))
            with pytest.raises(PoolError) as err:
                await task
            return err.value

        attempts = 0
        first = await attempt()
        attempts = 1
        assert first.kind is ErrorKind.LOAD_FAILED and first.retry_after == 5
        h.clock.now += 1
        again = await attempt()  # within the backoff: answered without a new worker
        assert len(h.launched) == 1 and again.retry_after == 4
        assert "failed to load 1 time(s) in a row" in again.message and "corrupt weights" in again.message
        h.clock.now += 4
        second = await attempt()
        assert len(h.launched) == 2 and second.retry_after == 10
    run(scenario)


def test_a_crash_after_loading_respawns_at_once() -> None:
    async def scenario() -> None:
        h = Harness("a")
        await _use(h, "a")
        h.launched[0].crash(-9)
        assert h.status("a") == "failed"
        await _use(h, "a")
        assert len(h.launched) == 2 and h.status("a") == "loaded"
    run(scenario)


def test_unload_fails_the_queued_waiters_with_503() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_models=1)
        held = h.hold("a")
        await held.leased.wait()
        waiter = h.hold("b")
        await until(lambda: h.pool.slot("b").admission is not None, "b queued")  # type: ignore[union-attr]
        await h.pool.unload("b")
        with pytest.raises(PoolError) as err:
            await waiter.task
        assert err.value.kind is ErrorKind.UNAVAILABLE and "waiting to load" in err.value.message
        held.release()
        await held.task
        assert h.names() == ["a"]
    run(scenario)


def test_draining_refuses_new_requests_and_reports_idle() -> None:
    async def scenario() -> None:
        h = Harness("a")
        held = h.hold("a")
        await held.leased.wait()
        h.pool.begin_drain(grace=30)
        assert not h.pool.idle
        with pytest.raises(PoolError) as err:
            await _use(h, "a")
        assert err.value.kind is ErrorKind.UNAVAILABLE and "shutting down" in err.value.message
        held.release()
        await held.task
        await tick()
        assert h.pool.idle
        h.clock.now += 10
        await h.pool.close()
        assert h.launched[0].stops == [20]  # what is left of the drain's grace
    run(scenario)


def test_strict_fifo_a_later_waiter_that_would_fit_does_not_overtake() -> None:
    async def scenario() -> None:
        h = Harness("a", "big", "small", memory=400 * MIB,
                    needs={"a": 200 * MIB, "big": 300 * MIB, "small": 100 * MIB})
        held = h.hold("a")
        await held.leased.wait()
        big = h.hold("big")  # needs a's memory: waits for a
        await until(lambda: h.pool.slot("big").wait_reason is not None, "big waits")  # type: ignore[union-attr]
        small = h.hold("small")  # would fit now, but came later
        await until(lambda: h.pool.slot("small").admission is not None, "small queued")  # type: ignore[union-attr]
        assert h.names() == ["a"] and h.pool.slot("small").wait_reason is None  # type: ignore[union-attr]
        held.release()  # a goes; then big and small both fit, big admitted first
        await big.leased.wait()
        big.release()
        await small.leased.wait()
        small.release()
        await asyncio.gather(held.task, big.task, small.task)
    run(scenario)


def test_a_model_still_stopping_holds_up_nobody_behind_it() -> None:
    async def scenario() -> None:
        h = Harness("x", "y", auto_ready=True)
        await _use(h, "x")
        x = h.launched[0]
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def slow_stop(grace: float) -> None:
            x.stops.append(grace)
            await never  # its requests are still finishing

        x.stop = slow_stop  # type: ignore[method-assign]
        unloading = asyncio.create_task(h.pool.unload("x"))
        await until(lambda: h.status("x") == "unloading", "x unloading")
        again = h.hold("x")  # waits for x's old worker to go
        await until(lambda: h.pool.slot("x").admission is not None, "x queued")  # type: ignore[union-attr]
        y = h.hold("y")  # room for y: it must not wait behind x
        await y.leased.wait()
        y.release()
        await y.task
        never.set_result(None)
        x.crash(0)
        await unloading
        await again.leased.wait()
        again.release()
        await again.task
    run(scenario)


def test_a_worker_dying_right_after_ready_is_a_failed_load_and_frees_its_place() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_models=1, auto_ready=False)
        first = asyncio.create_task(_use(h, "a"))
        await until(lambda: len(h.launched) == 1, "a launched")
        h.launched[0].ready.set_result(INFO)
        h.launched[0].crash(-9)  # before the load task resumes
        with pytest.raises(PoolError) as err:
            await first
        assert err.value.kind is ErrorKind.LOAD_FAILED and "right after loading" in err.value.message
        assert h.status("a") == "failed"
        b = asyncio.create_task(_use(h, "b"))  # a holds no place any more
        await until(lambda: len(h.launched) == 2, "b launched")
        h.launched[1].ready.set_result(INFO)
        await b
    run(scenario)


def test_a_loading_model_is_stopped_at_once() -> None:
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        waiter = asyncio.create_task(_use(h, "a"))
        await until(lambda: len(h.launched) == 1, "a loading")
        await h.pool.unload("a")
        assert h.launched[0].stops == [0]  # no grace for a load
        with pytest.raises(PoolError) as err:
            await waiter
        assert err.value.kind is ErrorKind.UNAVAILABLE
    run(scenario)


def test_unload_clears_the_backoff() -> None:
    async def scenario() -> None:
        h = Harness("bad", auto_ready=False)
        task = asyncio.create_task(_use(h, "bad"))
        await until(lambda: len(h.launched) == 1, "launched")
        h.launched[0].ready.set_exception(WorkerStartError("corrupt"))
        with pytest.raises(PoolError):
            await task
        await h.pool.unload("bad")
        h.auto_ready = True
        await _use(h, "bad")  # no backoff left: a fresh worker at once
        assert len(h.launched) == 2
    run(scenario)


def test_an_estimate_that_fails_is_no_error_and_is_tried_again() -> None:
    async def scenario() -> None:
        h = Harness("a")
        h.estimate_error = OverflowError("absurd header")
        await _use(h, "a")  # loads on the process overhead alone
        await h.pool.unload("a")
        h.estimate_error = None
        await _use(h, "a")
        assert h.estimates == 2  # the failure was not cached
    run(scenario)
