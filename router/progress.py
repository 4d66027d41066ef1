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

from protocol.messages import DownloadProgress
from router.slots import ModelStatus, Slot

_json = msgspec.json.Encoder()

THROTTLE_S = 0.1
QUEUE_EVENTS = 256


def event_line(model: str | None, event: str, data: dict[str, Any]) -> bytes:
    return b"data: " + _json.encode({"model": model, "event": event, "data": data}) + b"\n\n"


def model_state(slot: Slot) -> dict[str, Any]:
    """What a status_change (and a snapshot entry) says about a model."""
    state: dict[str, Any] = {"status": slot.public_status}
    if slot.status is ModelStatus.FAILED and slot.failure is not None:
        state["exit_code"] = slot.failure.exit_code
        state["message"] = slot.failure.message
    elif slot.status is ModelStatus.LOADING and slot.download is not None:
        state |= download_data(slot.download)
    elif slot.status is ModelStatus.LOADING and slot.stage:
        state["stage"] = slot.stage
        state["value"] = round(slot.progress, 4)
    return state


def download_data(msg: DownloadProgress) -> dict[str, Any]:
    eta = None if msg.eta_s is None else round(msg.eta_s, 1)
    return {"file": msg.file, "downloaded": msg.downloaded, "total": msg.total,
            "bytes_per_s": round(msg.bytes_per_s), "eta_s": eta}


class Resync:
    """Returned to a subscriber that fell behind: its events were dropped; send a snapshot."""


RESYNC = Resync()


class Subscriber:
    def __init__(self, limit: int) -> None:
        self._limit = limit
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
    def __init__(self, slots: Callable[[], list[Slot]], *, interval: float = THROTTLE_S,
                 queue_events: int = QUEUE_EVENTS, clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        self._slots = slots
        self._interval = interval
        self._queue_events = queue_events
        self._clock = clock
        self._call_later = call_later or (lambda delay, fn: asyncio.get_running_loop().call_later(delay, fn))
        self._subscribers: set[Subscriber] = set()
        self._sent_at: dict[tuple[str, str], float] = {}
        self._sent: dict[tuple[str, str], dict[str, Any]] = {}
        self._held: dict[tuple[str, str], dict[str, Any]] = {}
        self._timers: dict[tuple[str, str], Any] = {}
        self._downloading: dict[str, bool] = {}  # models between their first and last download report

    # ---- subscribers ----------------------------------------------------------

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self._queue_events)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def snapshot(self) -> bytes:
        models = [{"id": s.entry.name, **model_state(s)} for s in self._slots()]
        return event_line(None, "snapshot", {"models": models})

    def close(self) -> None:
        """End every subscriber's stream (the daemon is stopping)."""
        for sub in self._subscribers:
            sub.close()
        self._subscribers.clear()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ---- publishing -----------------------------------------------------------

    def watch(self, slot: Slot, what: str) -> None:
        """The pool's slots call this on every status change and load progress report."""
        name = slot.entry.name
        if what == "status":
            self._flush_model(name)  # progress held back goes out before the change
            was_downloading = slot.status is not ModelStatus.LOADING and self._downloading.pop(name, False)
            if slot.status is ModelStatus.FAILED and was_downloading:
                self.publish(name, "download_failed", model_state(slot))
            self.publish(name, "status_change", model_state(slot))
        elif slot.download is not None:
            msg = slot.download
            if not self._downloading.get(name):
                self._downloading[name] = True
                self.publish(name, "status_change", model_state(slot))  # now "downloading"
            self.progress(name, "download_progress", download_data(msg), final=msg.finished)
            if msg.finished:
                self._downloading.pop(name, None)
                self.publish(name, "download_finished", {"file": msg.file})
                self.publish(name, "status_change", {"status": ModelStatus.LOADING.value})
        else:
            self.progress(name, "load_progress", {"stage": slot.stage, "value": round(slot.progress, 4)},
                          final=slot.progress >= 1.0)

    def publish(self, model: str | None, event: str, data: dict[str, Any]) -> None:
        line = event_line(model, event, data)
        for sub in self._subscribers:
            sub.push(line)

    def progress(self, model: str, event: str, data: dict[str, Any], final: bool = False) -> None:
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

    def _send(self, key: tuple[str, str], data: dict[str, Any], now: float) -> None:
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
