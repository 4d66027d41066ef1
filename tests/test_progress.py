"""The /models/sse event feed without sockets: envelope, throttling on a fake clock and
timer, snapshots for subscribers that fall behind."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import DownloadProgress, LoadProgress, WorkerConfig
from router.catalog import ModelEntry
from router.progress import RESYNC, ModelEvents, Subscriber
from router.slots import Failure, ModelStatus, Slot


class Timers:
    """call_later on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.due: list[tuple[float, Callable[[], None], Timer]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer()
        self.due.append((self.now + delay, fn, timer))
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        ready = [d for d in self.due if d[0] <= self.now]
        self.due = [d for d in self.due if d[0] > self.now]
        for _, fn, timer in ready:
            if not timer.cancelled:
                fn()


class Timer:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def slot(name: str) -> Slot:
    return Slot(ModelEntry(name, Path(name), "fake", (), "config", WorkerConfig(name, name)))


@pytest.fixture
def setup() -> tuple[ModelEvents, Timers, list[Slot]]:
    timers = Timers()
    slots = [slot("a"), slot("b")]
    events = ModelEvents(lambda: slots, clock=lambda: timers.now, call_later=timers.call_later,
                         queue_events=8)
    for s in slots:
        s.watcher = events.watch
    return events, timers, slots


def drain(sub: Subscriber) -> list[dict[str, Any]]:
    got = asyncio.run(sub.take(0))
    assert isinstance(got, list)
    return [json.loads(line[len(b"data: "):]) for line in got]


def test_status_changes_go_out_as_llama_servers_envelope(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (a, _b) = setup
    sub = events.subscribe()
    a.status = ModelStatus.LOADING
    a.status = ModelStatus.LOADING  # not a change: no event
    a.failure = Failure("weights are corrupt", 3, [])
    a.status = ModelStatus.FAILED
    assert drain(sub) == [
        {"model": "a", "event": "status_change", "data": {"status": "loading"}},
        {"model": "a", "event": "status_change",
         "data": {"status": "failed", "exit_code": 3, "message": "weights are corrupt"}},
    ]
    snapshot = json.loads(events.snapshot()[len(b"data: "):])
    assert snapshot == {"model": None, "event": "snapshot", "data": {"models": [
        {"id": "a", "status": "failed", "exit_code": 3, "message": "weights are corrupt"},
        {"id": "b", "status": "unloaded"}]}}


def test_progress_is_throttled_but_the_first_and_the_last_go_out(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, timers, (a, _b) = setup
    sub = events.subscribe()
    a.status = ModelStatus.LOADING
    for i in range(10):  # ten reports within 45 ms
        a.report_progress(LoadProgress("load", i / 20))
        timers.advance(0.005)
    values = [e["data"]["value"] for e in drain(sub) if e["event"] == "load_progress"]
    assert values == [0.0]  # the first at once, the rest held back
    timers.advance(0.1)  # the interval ends: the latest held back goes out
    assert [e["data"]["value"] for e in drain(sub)] == [0.45]
    a.report_progress(LoadProgress("load", 0.5))  # within the next interval: held
    a.status = ModelStatus.LOADED  # ... and sent before the change
    assert [(e["event"], e["data"]) for e in drain(sub)] == [
        ("load_progress", {"stage": "load", "value": 0.5}),
        ("status_change", {"status": "loaded"})]
    timers.advance(1)
    assert asyncio.run(sub.take(0)) is None  # the cancelled timer sent nothing twice


def test_a_final_value_is_not_held_and_repeats_are_dropped(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (a, _b) = setup
    sub = events.subscribe()
    a.report_progress(LoadProgress("load", 0.0))
    a.report_progress(LoadProgress("load", 1.0))  # within the interval, but final
    a.report_progress(LoadProgress("load", 1.0))  # llama.cpp's 1.0, then the backend's
    assert [e["data"]["value"] for e in drain(sub)] == [0.0, 1.0]
    # Each model is throttled on its own.
    events.progress("b", "load_progress", {"value": 0.1})
    assert [e["model"] for e in drain(sub)] == ["b"]


def test_a_subscriber_that_falls_behind_gets_a_snapshot_instead(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (_, b) = setup
    slow, fast = events.subscribe(), events.subscribe()
    for i in range(20):  # more than its queue holds (8)
        events.publish("a", "status_change", {"n": i})
        if i % 4 == 0:
            drain(fast)
    assert asyncio.run(slow.take(0)) is RESYNC
    assert asyncio.run(slow.take(0)) is None  # what it missed is not sent after all
    b.status = ModelStatus.LOADING
    assert [e["model"] for e in drain(slow)] == ["b"]  # live again
    assert len(drain(fast)) == 4  # the other subscriber lost nothing


def test_close_ends_every_subscriber(setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, _ = setup
    sub = events.subscribe()

    async def wait_for_close() -> object:
        waiting = asyncio.create_task(sub.take(60))
        # Runs after the task's first step (callbacks run in order): it is waiting by then.
        asyncio.get_running_loop().call_soon(events.close)
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(wait_for_close()) is None and sub.closed


def test_a_download_is_a_status_of_its_own_with_its_events(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, timers, (a, b) = setup
    sub = events.subscribe()
    a.status = b.status = ModelStatus.LOADING
    a.report_progress(DownloadProgress("m.gguf", 0, 100, 0.0, None))
    timers.advance(0.2)
    a.report_progress(DownloadProgress("m.gguf", 100, 100, 50.0, 0.0, finished=True))
    a.report_progress(LoadProgress("load", 0.0))

    def got() -> list[tuple[str, str, object]]:
        return [(e["model"], e["event"], e["data"].get("status") or e["data"].get("downloaded"))
                for e in drain(sub)]

    assert got() == [
        ("a", "status_change", "loading"), ("b", "status_change", "loading"),
        ("a", "status_change", "downloading"), ("a", "download_progress", 0),
        ("a", "download_progress", 100), ("a", "download_finished", None), ("a", "status_change", "loading"),
        ("a", "load_progress", None)]
    b.report_progress(DownloadProgress("n.gguf", 5, 100, 5.0, 19.0))
    b.failure = Failure("HTTP 404", 3, [])
    b.status = ModelStatus.FAILED
    assert got() == [("b", "status_change", "downloading"), ("b", "download_progress", 5),
                     ("b", "download_failed", "failed"), ("b", "status_change", "failed")]
