"""The pool as the scheduler's effect runner, on fake workers: what it hands requests,
how it starts, stops and waits for workers, what it reports. No sleeps, no processes.
The scheduling decisions themselves are tests/test_scheduler.py's."""

from __future__ import annotations

import asyncio

import pytest

from protocol.errors import ErrorKind
from protocol.messages import DownloadProgress, LoadProgress
from router.admission import MIB
from router.catalog import Policy
from router.pool import PoolError
from router.supervisor import WorkerStartError
from tests.fakepool import INFO, LOAD_TIMEOUT, STOP_TIMEOUT, Harness, run, turns, until


def test_a_grant_hands_the_worker_to_notify() -> None:
    async def scenario() -> None:
        h = Harness("a")
        first = h.ask("a")
        assert not first.answered  # its estimate and its load come later
        await until(lambda: first.answered, "a granted")
        assert first.told == [h.launched[0]] and h.launched[0].load_timeouts == [LOAD_TIMEOUT]
        assert not h.pool.idle
        second = h.ask("a")  # loaded: told before `request` returns
        assert second.told == [h.launched[0]]
        view = h.pool.view("a")
        assert view is not None and view.worker is h.launched[0] and view.info == INFO
        first.release()
        assert not h.pool.idle
        second.release()
        assert h.pool.idle and len(h.launched) == 1 and first.told == [h.launched[0]]  # told once
    run(scenario)


def test_a_deny_hands_a_pool_error_with_kind_message_and_retry_after() -> None:
    async def scenario() -> None:
        h = Harness("bad", auto_ready=False)
        first = h.ask("bad")
        await until(lambda: len(h.launched) == 1, "bad launched")
        h.launched[0].ready.set_exception(WorkerStartError("corrupt weights"))
        await until(lambda: first.answered, "bad refused")
        err = first.error()
        assert err.kind is ErrorKind.LOAD_FAILED and err.retry_after == 5
        assert "failed to load: corrupt weights" in err.message and str(err) == err.message
        assert h.status("bad") == "failed"
        h.clock.now += 1
        again = h.ask("bad")  # within the backoff: refused at once, without a new worker
        assert again.error().kind is ErrorKind.LOAD_FAILED and again.error().retry_after == 4
        assert len(h.launched) == 1
        missing = h.ask("nope")
        assert missing.ticket == 0 and missing.error().kind is ErrorKind.NOT_FOUND
        assert "'nope' not found" in missing.error().message
    run(scenario)


def test_unload_returns_only_after_the_worker_exits() -> None:
    async def scenario() -> None:
        h = Harness("a")
        worker = await h.use("a")
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        h.launched[0].stop_gate = gate  # its last requests take their time
        unloading = asyncio.create_task(h.pool.unload("a"))
        await until(lambda: h.launched[0].stops == [STOP_TIMEOUT], "a asked to stop")
        assert h.status("a") == "unloading"
        await turns(20)
        assert not unloading.done() and worker.alive
        gate.set_result(None)
        await unloading
        assert not worker.alive and h.status("a") == "unloaded"
        assert h.pool.view("a") is not None and h.pool.worker("a") is None
    run(scenario)


def test_unloading_a_loading_model_stops_it_at_once_and_refuses_its_waiters() -> None:
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        waiter = h.ask("a")
        await until(lambda: len(h.launched) == 1, "a loading")
        await h.pool.unload("a")  # returns once the worker is gone
        assert h.launched[0].stops == [0.0] and not h.launched[0].alive  # no grace for a load
        err = waiter.error()
        assert err.kind is ErrorKind.UNAVAILABLE and "was loading and it was unloaded" in err.message
        await until(lambda: h.status("a") == "unloaded", "a unloaded")
        await turns(5)
        assert h.status("a") == "unloaded" and h.pool.idle  # the stopped load's end changes nothing
    run(scenario)


def test_load_with_wait_returns_once_loaded_and_holds_no_place() -> None:
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        loading = asyncio.create_task(h.pool.load("a", wait=True))
        await until(lambda: len(h.launched) == 1, "a launched")
        await turns(5)
        assert not loading.done() and h.status("a") == "loading"
        h.launched[0].ready.set_result(INFO)
        await loading
        assert h.status("a") == "loaded" and h.pool.idle  # nothing to serve: no request held
        await h.pool.load("a", wait=True)  # loaded already: at once, and no second worker
        assert len(h.launched) == 1 and h.pool.idle
    run(scenario)


def test_load_with_wait_raises_the_load_failure() -> None:
    async def scenario() -> None:
        h = Harness("bad", auto_ready=False)
        loading = asyncio.create_task(h.pool.load("bad", wait=True))
        await until(lambda: len(h.launched) == 1, "bad launched")
        h.launched[0].ready.set_exception(WorkerStartError("corrupt weights"))
        with pytest.raises(PoolError) as err:
            await loading
        assert err.value.kind is ErrorKind.LOAD_FAILED and "corrupt weights" in err.value.message
        loading = asyncio.create_task(h.pool.load("bad", wait=True))  # an operator skips the backoff
        await until(lambda: len(h.launched) == 2, "bad launched again")
        h.launched[1].ready.set_result(INFO)
        await loading
        assert h.status("bad") == "loaded"
    run(scenario)


def test_load_without_wait_returns_at_once_or_raises_a_refusal_made_at_once() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", auto_ready=False, max_waiting=1)
        await h.pool.load("a", wait=False)  # returns with the load under way
        assert h.launched == [] and not h.pool.idle  # its estimate has not even come back
        with pytest.raises(PoolError) as err:
            await h.pool.load("b", wait=False)  # one waits already: max_waiting
        assert err.value.kind is ErrorKind.UNAVAILABLE and "max_waiting 1" in err.value.message
        with pytest.raises(PoolError) as err:
            await h.pool.load("nope", wait=False)
        assert err.value.kind is ErrorKind.NOT_FOUND
        await until(lambda: len(h.launched) == 1, "a launched")
        h.launched[0].ready.set_result(INFO)
        await until(lambda: h.status("a") == "loaded", "a loaded")
        assert h.pool.idle  # the load let go of its ticket once done
        h.pool.drain()
        with pytest.raises(PoolError) as err:
            await h.pool.load("b", wait=False)
        assert err.value.kind is ErrorKind.UNAVAILABLE and "shutting down" in err.value.message
    run(scenario)


def test_a_worker_dying_right_after_ready_is_a_load_failure() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", max_models=1, auto_ready=False)
        first = h.ask("a")
        await until(lambda: len(h.launched) == 1, "a launched")
        h.launched[0].ready.set_result(INFO)
        h.launched[0].crash(-9)  # before the load task resumes
        await until(lambda: first.answered, "a answered")
        err = first.error()
        assert err.kind is ErrorKind.LOAD_FAILED and "right after loading" in err.message
        assert "exit code -9" in err.message and h.status("a") == "failed"
        second = h.ask("b")  # a holds no place any more
        await until(lambda: len(h.launched) == 2, "b launched")
        h.launched[1].ready.set_result(INFO)
        await until(lambda: second.answered, "b granted")
        assert second.worker() is h.launched[1]
    run(scenario)


def test_a_crash_marks_the_model_failed_and_the_next_request_spawns_a_new_worker() -> None:
    async def scenario() -> None:
        h = Harness("a")
        held = h.ask("a")
        await until(lambda: held.answered, "a granted")
        h.launched[0].crash(-11)
        view = h.pool.view("a")
        assert view is not None and view.status.value == "failed" and view.worker is None
        assert view.model.failure is not None
        assert "worker exited unexpectedly (exit code -11)" in view.model.failure.message
        assert view.model.failure.log_tail == ("a says goodbye",)
        held.release()
        worker = await h.use("a")  # no backoff after a crash: a fresh worker at once
        assert len(h.launched) == 2 and worker is h.launched[1] and h.status("a") == "loaded"
    run(scenario)


def test_close_stops_every_worker_with_the_grace_and_ends_every_task() -> None:
    async def scenario() -> None:
        before = asyncio.all_tasks()
        h = Harness("a", "b", "c", auto_ready=False, policies={"a": Policy(load_on_startup=True)})
        h.pool.start()  # the timer, and a's load at startup
        await until(lambda: len(h.launched) == 1, "a loads at startup")
        h.launched[0].ready.set_result(INFO)
        await until(lambda: h.status("a") == "loaded", "a loaded")
        h.auto_ready = True
        served = h.ask("b")
        await until(lambda: served.answered, "b granted")
        h.auto_ready = False
        waiting = h.ask("c")
        await until(lambda: len(h.launched) == 3, "c loading")
        await h.pool.close(3.0)
        a, b, c = h.launched
        assert a.stops == [3.0] and b.stops == [3.0]  # what runs gets the grace
        assert c.stops == [0.0]  # a load has nothing to finish
        assert not any(w.alive for w in h.launched)
        assert waiting.error().kind is ErrorKind.UNAVAILABLE
        assert asyncio.all_tasks() == before  # the timer and every load and stop ended
        assert h.ask("a").error().kind is ErrorKind.UNAVAILABLE
    run(scenario)


def test_cut_stops_every_worker_without_grace() -> None:
    async def scenario() -> None:
        h = Harness("a", "b", auto_ready=False)
        served = h.ask("a")
        await until(lambda: len(h.launched) == 1, "a launched")
        h.launched[0].ready.set_result(INFO)
        await until(lambda: served.answered, "a granted")
        waiting = h.ask("b")
        await until(lambda: len(h.launched) == 2, "b loading")
        h.pool.drain()
        assert not waiting.answered  # a drain lets those waiting wait
        h.pool.cut()  # the second signal
        err = waiting.error()
        assert err.kind is ErrorKind.UNAVAILABLE and "shutting down" in err.message
        await until(lambda: not any(w.alive for w in h.launched), "every worker gone")
        assert all(w.stops and set(w.stops) == {0.0} for w in h.launched), [w.stops for w in h.launched]
        served.release()
        await h.pool.close(30.0)
        assert all(set(w.stops) == {0.0} for w in h.launched)  # nothing left to give grace to
    run(scenario)


def test_the_estimator_runs_once_per_load_and_a_failing_one_is_no_error() -> None:
    async def scenario() -> None:
        h = Harness("a")
        h.estimate_error = OverflowError("absurd header")
        asks = [h.ask("a") for _ in range(3)]
        await until(lambda: all(a.answered for a in asks), "all granted")
        assert all(a.worker() is h.launched[0] for a in asks)  # loaded without an estimate
        assert h.estimates == ["a"]  # one estimate for the three
        for a in asks:
            a.release()
        await h.use("a")  # loaded already: nothing to estimate
        assert h.estimates == ["a"]
        await h.pool.unload("a")
        h.estimate_error = None
        await h.use("a")
        assert h.estimates == ["a", "a"]  # the next load estimates again
    run(scenario)


def test_memory_is_judged_from_the_estimate_and_the_workers_rss() -> None:
    async def scenario() -> None:
        h = Harness("huge", memory=150 * MIB, needs={"huge": 200 * MIB})
        too_big = h.ask("huge")
        await until(lambda: too_big.answered, "huge refused")
        err = too_big.error()
        assert err.kind is ErrorKind.UNAVAILABLE and h.launched == []
        assert "does not fit in memory: it needs about 200 MiB" in err.message
        assert "150 MiB is available" in err.message
        h = Harness("a", "b", "c", memory=450 * MIB, need=200 * MIB)
        await h.use("a")
        await h.use("b")  # 50 MiB left by the workers' RSS: c needs a, and only a, to go
        await h.use("c")
        assert h.names() == ["a", "b", "c"]
        assert h.launched[0].stops == [STOP_TIMEOUT] and h.launched[1].stops == []
        view = h.pool.view("c")
        assert view is not None and view.rss == 200 * MIB
    run(scenario)


def test_on_status_reports_each_change_and_on_progress_each_report() -> None:
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        held = h.ask("a")
        await until(lambda: len(h.launched) == 1, "a launched")
        assert h.statuses == [("a", "loading")] and h.progress == []
        worker = h.launched[0]
        worker.progress(DownloadProgress("a.gguf", 50, 200, 10.0, 15.0))
        assert h.progress == [("a", "downloading", "download", 0.25)]
        view = h.pool.view("a")
        assert view is not None and view.public_status == "downloading"
        assert view.progress.download is not None and view.progress.download.downloaded == 50
        worker.progress(DownloadProgress("a.gguf", 200, 200, 10.0, 0.0, finished=True))
        worker.progress(LoadProgress("weights", 0.5))
        assert h.progress[1:] == [("a", "loading", "", 1.0), ("a", "loading", "weights", 0.5)]
        worker.ready.set_result(INFO)
        await until(lambda: held.answered, "a granted")
        assert h.statuses == [("a", "loading"), ("a", "loaded")]
        held.release()
        idles = h.idles
        assert idles >= 1 and h.pool.idle
        await h.pool.unload("a")
        assert h.statuses[2:] == [("a", "unloading"), ("a", "unloaded")]
        reported = len(h.progress)
        worker.progress(LoadProgress("weights", 0.9))  # news of a worker that is gone
        assert len(h.progress) == reported
        again = h.ask("a")
        await until(lambda: len(h.launched) == 2, "a launched again")
        view = h.pool.view("a")
        assert view is not None and view.progress.stage == "" and view.progress.value == 0.0  # a new load
        h.launched[1].ready.set_result(INFO)
        await until(lambda: again.answered, "a granted again")
        again.release()
        assert h.idles > idles
    run(scenario)


def test_a_crash_during_a_load_then_an_unload_does_not_wedge_the_model() -> None:
    # WorkerProcess reports a death at once (on_exit) and its start raises a loop turn
    # later. An unload in between makes the scheduler ignore both reports (the exit:
    # "its load reports the outcome"; the load's failure: the model is UNLOADING by
    # then), so the model must not be left UNLOADING for good with its next request
    # waiting forever. See test_scheduler's
    # test_a_crash_during_a_load_then_an_unload_leaves_the_model_unloaded.
    async def scenario() -> None:
        h = Harness("a", auto_ready=False)
        h.ask("a")
        await until(lambda: len(h.launched) == 1, "a loading")
        h.launched[0].crash(-9)
        await h.pool.unload("a")  # before the load task has heard of the death
        await turns(10)
        assert h.status("a") in ("unloaded", "failed"), f"a stays {h.status('a')}"
        h.auto_ready = True
        again = h.ask("a")
        await until(lambda: again.answered, "a served again")
        assert again.worker() is h.launched[-1]
    run(scenario)
