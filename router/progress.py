"""The model event feed behind `GET /models/sse`: status changes, download and load
progress of every model (and pulls, cache removals), fanned out to any number of
subscribers.

Events use llama-server's envelope, one per SSE `data:` line:
`{"model": name, "event": kind, "data": {...}}`. A subscriber first gets one
`snapshot` event (every model's state), then live events.

The pool publishes from the event loop and never waits: each subscriber has a
bounded queue, and one that falls behind loses its queue and gets a fresh snapshot
instead, so a slow client slows neither the workers nor the other clients.
Progress events are throttled per model and kind: the first goes out at once, then
at most one per interval, and the latest held back goes out when the interval ends
(or before the model's next status change), so the last value always arrives.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from protocol.messages import DownloadProgress
from router.modelstate import ModelStatus
from router.pool import ModelView
from router.schema import (
    DoneTotal,
    DownloadEvent,
    DownloadState,
    FeedData,
    FeedEvent,
    FeedState,
    FileDone,
    LoadStages,
    Snapshot,
)

_json = msgspec.json.Encoder()

THROTTLE_S = 0.1
QUEUE_EVENTS = 256


def event_line(model: str | None, event: str, data: FeedData | UnsetType = UNSET) -> bytes:
    return b"data: " + _json.encode(FeedEvent(model, event, data)) + b"\n\n"


def model_state(view: ModelView) -> FeedState:
    """What a status_change (and a snapshot entry) says about a model."""
    state = FeedState(status=view.public_status)
    m, progress = view.model, view.progress
    if m.status is ModelStatus.FAILED and m.failure is not None:
        state.exit_code = m.failure.exit_code
        state.message = m.failure.message
    elif m.status is ModelStatus.LOADING and progress.download is not None:
        d = download_data(progress.download)
        state.file, state.downloaded, state.total = d.file, d.downloaded, d.total
        state.bytes_per_s, state.eta_s = d.bytes_per_s, d.eta_s
    elif m.status is ModelStatus.LOADING and progress.stage:
        state.stage = progress.stage
        state.value = round(progress.value, 4)
        state.progress = LoadStages(state.value)
    return state


def download_data(msg: DownloadProgress) -> DownloadState:
    eta = None if msg.eta_s is None else round(msg.eta_s, 1)
    return DownloadState(msg.file, msg.downloaded, msg.total, round(msg.bytes_per_s), eta)


def download_event(msg: DownloadProgress) -> DownloadEvent:
    d = download_data(msg)
    return DownloadEvent({msg.file: DoneTotal(msg.downloaded, msg.total)}, d.file, d.downloaded, d.total,
                         d.bytes_per_s, d.eta_s)


class Resync:
    """Returned to a subscriber that fell behind: its events were dropped; send a snapshot."""


RESYNC = Resync()


class Subscriber:
    def __init__(self, limit: int, sees: Callable[[str | None], bool] = lambda model: True) -> None:
        self._limit = limit
        self.sees = sees  # the models its API key may see
        self._lines: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._resync = False
        self.closed = False

    def push(self, line: bytes) -> None:
        if self._resync:
            return  # the snapshot it will get is taken later, and covers this
        if len(self._lines) >= self._limit:
            self._lines.clear()
            self._resync = True
        else:
            self._lines.append(line)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def take(self, idle: float) -> list[bytes] | Resync | None:
        """Queued lines, RESYNC, or None when `idle` seconds passed with nothing (or it closed)."""
        if not self._lines and not self._resync and not self.closed:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), idle)
            except TimeoutError:
                return None
        if self._resync:
            self._resync = False
            return RESYNC
        lines = list(self._lines)
        self._lines.clear()
        return lines or None


class ModelEvents:
    def __init__(self, views: Callable[[], list[ModelView]], *, interval: float = THROTTLE_S,
                 queue_events: int = QUEUE_EVENTS, clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self._views = views
        self._interval = interval
        self._queue_events = queue_events
        self._clock = clock
        self._call_later = call_later or (lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))
        self._subscribers: set[Subscriber] = set()
        self._sent_at: dict[tuple[str, str], float] = {}
        self._sent: dict[tuple[str, str], FeedData] = {}
        self._held: dict[tuple[str, str], FeedData] = {}
        self._timers: dict[tuple[str, str], Any] = {}
        self._downloading: dict[str, bool] = {}  # models between their first and last download report

    # ---- subscribers ----------------------------------------------------------

    def subscribe(self, sees: Callable[[str | None], bool] = lambda model: True) -> Subscriber:
        sub = Subscriber(self._queue_events, sees)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def snapshot(self, sub: Subscriber | None = None) -> bytes:
        models = []
        for view in self._views():
            if sub is not None and not sub.sees(view.name):
                continue
            state = model_state(view)
            state.id = view.name
            models.append(state)
        return event_line(None, "snapshot", Snapshot(models))

    def close(self) -> None:
        """End every subscriber's stream (the daemon is stopping)."""
        for sub in self._subscribers:
            sub.close()
        self._subscribers.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ---- publishing -----------------------------------------------------------

    def status(self, view: ModelView) -> None:
        """The pool reports every status change of a model."""
        name = view.name
        self._flush_model(name)  # progress held back goes out before the change
        was_downloading = view.status is not ModelStatus.LOADING and self._downloading.pop(name, False)
        if view.status is ModelStatus.FAILED and was_downloading:
            self.publish(name, "download_failed", model_state(view))
        self.publish(name, "status_change", model_state(view))

    def load_progress(self, view: ModelView) -> None:
        """The pool reports every progress report of a model's load (or download)."""
        name = view.name
        progress = view.progress
        if progress.download is not None:
            msg = progress.download
            if not self._downloading.get(name):
                self._downloading[name] = True
                self.publish(name, "status_change", model_state(view))  # now "downloading"
            self.progress(name, "download_progress", download_event(msg), final=msg.finished)
            if msg.finished:
                self._downloading.pop(name, None)
                self.publish(name, "download_finished", FileDone(msg.file))
                self.publish(name, "status_change", FeedState(status=ModelStatus.LOADING.value))
        else:  # llama-server reports load progress inside status_change
            value = round(progress.value, 4)
            self.progress(name, "status_change", FeedState("loading", stage=progress.stage, value=value,
                                                           progress=LoadStages(value)), final=value >= 1.0)

    def publish(self, model: str | None, event: str, data: FeedData | UnsetType = UNSET) -> None:
        line = event_line(model, event, data)
        for sub in self._subscribers:
            if sub.sees(model):
                sub.push(line)

    def progress(self, model: str, event: str, data: FeedData, final: bool = False) -> None:
        key = (model, event)
        if self._sent.get(key) == data and key not in self._held:
            return  # a repeat (llama.cpp reports 1.0, then the backend does)
        now = self._clock()
        last = self._sent_at.get(key)
        if final or last is None or now - last >= self._interval:
            self._held.pop(key, None)
            self._send(key, data, now)
            return
        self._held[key] = data  # the latest wins
        if key not in self._timers:
            self._timers[key] = self._call_later(self._interval - (now - last), lambda: self._release(key))

    def _release(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        data = self._held.pop(key, None)
        if data is not None:
            self._send(key, data, self._clock())

    def _send(self, key: tuple[str, str], data: FeedData, now: float) -> None:
        self._sent_at[key] = now
        self._sent[key] = data
        self.publish(key[0], key[1], data)

    def _flush_model(self, model: str) -> None:
        """Send what is held back for `model` now, and let its next progress go out at once."""
        for key in [k for k in self._sent_at if k[0] == model]:
            timer = self._timers.pop(key, None)
            if timer is not None:
                timer.cancel()
            data = self._held.pop(key, None)
            if data is not None:
                self.publish(key[0], key[1], data)
            del self._sent_at[key]
            self._sent.pop(key, None)
