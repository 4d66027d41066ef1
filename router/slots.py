"""What the pool keeps per model, and the effects it reaches processes through.

A `Slot` is one catalog model's state. `WorkerHandle`, `Launcher` and `Memory` are
the pool's only ways to touch processes and the machine: the daemon passes the real
ones (router.supervisor, router.footprint), tests pass fakes. The functions at the end
turn slots into what `admission.plan` decides on, and its answers into errors.
"""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.errors import ErrorKind
from protocol.messages import DownloadProgress, LoadProgress, ModelInfo
from router.admission import MIB, Holder, Refuse
from router.catalog import ModelEntry
from router.footprint import Estimate, mib


class ModelStatus(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


HOLDING = (ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.UNLOADING)  # take a place


class PoolError(Exception):
    def __init__(self, kind: ErrorKind, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class WorkerHandle(Protocol):
    """What the pool needs of a worker process (router.supervisor.WorkerProcess)."""

    identity: bytes
    exit_code: int | None

    @property
    def pid(self) -> int | None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def log_tail(self) -> Sequence[str]: ...
    async def start(self, load_timeout: float) -> ModelInfo: ...
    async def stop(self, grace: float) -> None: ...
    def gone_error(self) -> tuple[ErrorKind, str]: ...
    def describe_exit(self) -> str: ...


ProgressFn = Callable[[LoadProgress | DownloadProgress], None]
Launcher = Callable[[ModelEntry, ProgressFn, Callable[[WorkerHandle], None]], WorkerHandle]


class Memory(Protocol):
    def available(self) -> int: ...
    def rss(self, pid: int) -> int | None: ...


@dataclass(frozen=True)
class PoolSettings:
    max_models: int = 4
    max_waiting: int = 256
    memory_margin: int = 512 * MIB
    load_timeout: float = 600.0
    stop_timeout: float = 10.0


@dataclass
class Failure:
    message: str
    exit_code: int | None
    log_tail: list[str]


@dataclass
class Slot:
    entry: ModelEntry
    _status: ModelStatus = ModelStatus.UNLOADED
    worker: WorkerHandle | None = None
    load_task: asyncio.Task[WorkerHandle] | None = None
    progress: float = 0.0  # of the load stage the worker last reported
    stage: str = ""  # "download", or a load stage: e.g. "weights" (llama.cpp reports "load")
    download: DownloadProgress | None = None  # the last download report, while downloading
    in_flight: int = 0  # leases held: waiting for the model or being served
    waiting: int = 0  # of those, still waiting for the model
    last_used: float = 0.0
    failure: Failure | None = None
    failures: int = 0  # consecutive failed loads
    retry_at: float = 0.0  # no automatic load before this (monotonic)
    info: ModelInfo | None = None
    estimate: Estimate | None = None
    last_rss: int = 0  # measured after its last load: a better guess than the estimate
    admission: asyncio.Future[None] | None = None  # while queued
    admission_waiters: int = 0
    wait_reason: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Told of each status change ("status") and load progress report ("progress"): the
    # /models/sse feed. Set once, before the pool starts.
    watcher: Callable[[Slot, str], None] | None = None

    @property
    def status(self) -> ModelStatus:
        return self._status

    @status.setter
    def status(self, value: ModelStatus) -> None:
        if value is not self._status:
            self._status = value
            if self.watcher is not None:
                self.watcher(self, "status")

    def reset_progress(self) -> None:
        """A new load begins: nothing of the last one's progress holds."""
        self.stage, self.progress, self.download = "", 0.0, None

    def report_progress(self, msg: LoadProgress | DownloadProgress) -> None:
        if isinstance(msg, DownloadProgress):
            self.download = msg
            self.stage = "" if msg.finished else "download"  # then it loads
            self.progress = msg.downloaded / msg.total if msg.total else 0.0
        else:
            self.download = None
            self.stage, self.progress = msg.stage, msg.value
        if self.watcher is not None:
            self.watcher(self, "progress")

    @property
    def public_status(self) -> str:
        """The status clients see: a load still fetching its files is "downloading"."""
        if self._status is ModelStatus.LOADING and self.stage == "download":
            return "downloading"
        return self._status.value

    @property
    def need(self) -> int:
        return max(self.estimate.total if self.estimate else 0, self.last_rss)


def backoff_error(slot: Slot, now: float) -> PoolError:
    """A failed model within its backoff (or the load a request waited for failed)."""
    left = max(0.0, slot.retry_at - now)
    reason = slot.failure.message if slot.failure else "unknown"
    return PoolError(ErrorKind.LOAD_FAILED,
                     f"model {slot.entry.name!r} failed to load {slot.failures} time(s) in a row; "
                     f"next attempt in {left:.0f} s. Last error: {reason}", retry_after=math.ceil(left))


def refusal_error(slot: Slot, decision: Refuse, available: int, margin: int) -> PoolError:
    """A model that can never fit: pinned models hold every place, or memory is too small."""
    name = slot.entry.name
    if not decision.memory:
        return PoolError(ErrorKind.UNAVAILABLE, f"model {name!r} cannot be loaded: {decision.reason}")
    need = slot.estimate.describe() if slot.estimate else f"about {mib(slot.need)}"
    if slot.last_rss > (slot.estimate.total if slot.estimate else 0):
        need = f"about {mib(slot.last_rss)} (measured at its last load)"
    return PoolError(ErrorKind.UNAVAILABLE,
                     f"model {name!r} does not fit in memory: it needs {need}; "
                     f"{mib(max(0, available + margin))} is available and memory_margin_mb keeps "
                     f"{mib(margin)} free")


# ---- what live models hold, as admission.plan sees it --------------------------------


def slot_rss(slot: Slot, memory: Memory) -> int | None:
    """The real size of the model's worker, if it has one."""
    pid = slot.worker.pid if slot.worker is not None else None
    return memory.rss(pid) if pid is not None else None


def holders(slots: list[Slot], exclude: Slot, rss: dict[str, int]) -> list[Holder]:
    """`rss`: each live model's RSS, read once per decision (see `live_rss`)."""
    out = []
    for s in slots:
        if s is exclude or s.status not in HOLDING:
            continue
        idle = (s.status is ModelStatus.LOADED and s.in_flight == 0 and s.worker is not None
                and s.worker.alive)
        claim = max(s.need, rss[s.entry.name])  # its estimate, or its RSS if larger
        out.append(Holder(s.entry.name, idle and not s.entry.policy.pinned, s.entry.policy.pinned,
                          s.last_used, claim))
    return out


def live_rss(slots: list[Slot], memory: Memory) -> dict[str, int]:
    return {s.entry.name: slot_rss(s, memory) or 0 for s in slots if s.status in HOLDING}


def memory_budget(slots: list[Slot], rss: dict[str, int], available: int, margin: int) -> int:
    """Free memory minus the margin, minus what live models claim beyond what the kernel
    already counts as used. Mapped weights look "available" to the kernel (page cache)
    though dropping them would thrash, and a loading model has not touched its memory
    yet: both are subtracted here. The kernel does count the anonymous part of RSS."""
    claimed = 0
    for s in slots:
        if s.status in HOLDING:
            used = rss[s.entry.name]
            weights = s.estimate.weights if s.estimate else 0
            claimed += max(s.need, used) - max(0, used - weights)
    return available - margin - claimed


def stopped_under_us(awaited: asyncio.Future[Any]) -> bool:
    """Our wait ended because what we awaited was cancelled (an unload, a shutdown), not
    because our own task was: the first gets an answer, the second propagates."""
    current = asyncio.current_task()
    return awaited.cancelled() and not (current and current.cancelling())
