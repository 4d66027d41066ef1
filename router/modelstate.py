"""What the scheduler knows of each model: its status, its requests, its failures.

Plain data. Only router.scheduler writes it; the pool and the routes read it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.errors import ErrorKind
from router.admission import Estimate
from router.catalog import ModelEntry


class ModelStatus(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


HOLDING = (ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.UNLOADING)  # take a place


@dataclass(frozen=True)
class Failure:
    message: str
    exit_code: int | None = None
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejection:
    """Why a request gets no worker: what the client is answered."""

    kind: ErrorKind
    message: str
    retry_after: int | None = None


@dataclass(eq=False)
class Model:
    """What the scheduler knows of one model. Read by the views; written only here."""

    entry: ModelEntry
    status: ModelStatus = ModelStatus.UNLOADED
    gen: int = 0  # the worker started (or to start) for it; 0: none
    started: bool = False  # StartLoad went out for `gen` (not yet while victims stop)
    exited: bool = False  # its worker exited while it loaded: the load's outcome is to come
    serving: set[int] = field(default_factory=set)  # waiters granted and not released
    waiters: list[int] = field(default_factory=list)  # waiting for it, in arrival order
    last_used: float = 0.0
    failure: Failure | None = None
    failures: int = 0  # failed loads in a row
    retry_at: float = 0.0  # no automatic load before this
    estimate: Estimate | None = None
    estimating: bool = False
    estimated: bool = False  # an estimate was tried for the coming load
    last_rss: int = 0  # measured after its last load: a better guess than the estimate
    queued: bool = False  # in the admission queue
    wait_reason: str | None = None
    victims: set[str] = field(default_factory=set)  # stopping to make room for its load
    evicted: tuple[str, ...] = ()  # every model stopped to make room for its load
    retired: bool = False  # gone from the catalog: unloaded once idle, then forgotten
    stale: bool = False  # its entry changed while it ran: reloaded once idle

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def need(self) -> int:
        return max(self.estimate.total if self.estimate else 0, self.last_rss)

    @property
    def ready(self) -> bool:
        return self.status is ModelStatus.LOADED

    @property
    def busy(self) -> bool:
        return bool(self.serving or self.waiters)
