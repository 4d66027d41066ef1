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
from router.modelstate import Failure, Model, ModelStatus
from router.pool import ModelView, Progress
from router.progress import RESYNC, ModelEvents, Subscriber
from router.schema import FeedState


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


class Slot:
    """A model as the pool reports it to the feed: each status change and progress report."""

    def __init__(self, name: str) -> None:
        self.model = Model(ModelEntry(name, Path(name), "fake", (), "config", WorkerConfig(name, name)))
        self.progress = Progress()
        self.events: ModelEvents | None = None

    @property
    def view(self) -> ModelView:
        return ModelView(self.model, self.progress, None, None, None)

    def set(self, status: ModelStatus, failure: Failure | None = None) -> None:
        self.model.failure = failure or self.model.failure
        if status is not self.model.status:
            self.model.status = status
            assert self.events is not None
            self.events.status(self.view)

    def report(self, msg: LoadProgress | DownloadProgress) -> None:
        self.progress.report(msg)
        assert self.events is not None
        self.events.load_progress(self.view)


@pytest.fixture
def setup() -> tuple[ModelEvents, Timers, list[Slot]]:
    timers = Timers()
    slots = [Slot("a"), Slot("b")]
    events = ModelEvents(lambda: [s.view for s in slots], clock=lambda: timers.now,
                         call_later=timers.call_later, queue_events=8)
    for s in slots:
        s.events = events
    return events, timers, slots


def drain(sub: Subscriber) -> list[dict[str, Any]]:
    got = asyncio.run(sub.take(0))
    assert isinstance(got, list)
    return [json.loads(line[len(b"data: "):]) for line in got]


def test_status_changes_go_out_as_llama_servers_envelope(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (a, _b) = setup
    sub = events.subscribe()
    a.set(ModelStatus.LOADING)
    a.set(ModelStatus.LOADING)  # not a change: no event
    a.set(ModelStatus.FAILED, Failure("weights are corrupt", 3))
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
    a.set(ModelStatus.LOADING)
    for i in range(10):  # ten reports within 45 ms
        a.report(LoadProgress("load", i / 20))
        timers.advance(0.005)
    values = [e["data"]["progress"]["value"] for e in drain(sub) if "progress" in e["data"]]
    assert values == [0.0]  # the first at once, the rest held back
    timers.advance(0.1)  # the interval ends: the latest held back goes out
    assert [e["data"]["progress"]["value"] for e in drain(sub)] == [0.45]
    a.report(LoadProgress("load", 0.5))  # within the next interval: held
    a.set(ModelStatus.LOADED)  # ... and sent before the change
    # llama-server's shape: load progress inside status_change (its web UI reads it there).
    assert [(e["event"], e["data"]) for e in drain(sub)] == [
        ("status_change", {"status": "loading", "progress": {
            "value": 0.5, "current": "text_model", "stages": ["text_model"]}, "stage": "load", "value": 0.5}),
        ("status_change", {"status": "loaded"})]
    timers.advance(1)
    assert asyncio.run(sub.take(0)) is None  # the cancelled timer sent nothing twice


def test_a_final_value_is_not_held_and_repeats_are_dropped(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (a, _b) = setup
    sub = events.subscribe()
    a.report(LoadProgress("load", 0.0))
    a.report(LoadProgress("load", 1.0))  # within the interval, but final
    a.report(LoadProgress("load", 1.0))  # llama.cpp's 1.0, then the backend's
    assert [e["data"]["progress"]["value"] for e in drain(sub)] == [0.0, 1.0]
    # Each model is throttled on its own.
    events.progress("b", "status_change", FeedState(status="x"))
    assert [e["model"] for e in drain(sub)] == ["b"]


def test_a_subscriber_that_falls_behind_gets_a_snapshot_instead(
        setup: tuple[ModelEvents, Timers, list[Slot]]) -> None:
    events, _, (_, b) = setup
    slow, fast = events.subscribe(), events.subscribe()
    for i in range(20):  # more than its queue holds (8)
        events.publish("a", "status_change", FeedState(status=str(i)))
        if i % 4 == 0:
            drain(fast)
    assert asyncio.run(slow.take(0)) is RESYNC
    assert asyncio.run(slow.take(0)) is None  # what it missed is not sent after all
    b.set(ModelStatus.LOADING)
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
    a.set(ModelStatus.LOADING)
    b.set(ModelStatus.LOADING)
    a.report(DownloadProgress("m.gguf", 0, 100, 0.0, None))
    timers.advance(0.2)
    a.report(DownloadProgress("m.gguf", 100, 100, 50.0, 0.0, finished=True))
    a.report(LoadProgress("load", 0.0))

    def got() -> list[tuple[str, str, object]]:
        return [(e["model"], e["event"], e["data"].get("status") or e["data"].get("downloaded"))
                for e in drain(sub)]

    assert got() == [
        ("a", "status_change", "loading"), ("b", "status_change", "loading"),
        ("a", "status_change", "downloading"), ("a", "download_progress", 0),
        ("a", "download_progress", 100), ("a", "download_finished", None), ("a", "status_change", "loading"),
        ("a", "status_change", "loading")]  # the load's progress
    sub = events.subscribe()
    timers.advance(0.2)
    a.report(DownloadProgress("m2.gguf", 7, 9, 1.0, 2.0))
    progress = [e["data"] for e in drain(sub) if e["event"] == "download_progress"]
    assert progress[0]["progress"] == {"m2.gguf": {"done": 7, "total": 9}}  # llama-server's key
    b.report(DownloadProgress("n.gguf", 5, 100, 5.0, 19.0))
    b.set(ModelStatus.FAILED, Failure("HTTP 404", 3))
    assert got() == [("b", "status_change", "downloading"), ("b", "download_progress", 5),
                     ("b", "download_failed", "failed"), ("b", "status_change", "failed")]
