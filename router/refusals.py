"""What a request is told when its model cannot serve it: the words of the scheduler's
refusals (router.scheduler decides; these say why, with the numbers)."""

from __future__ import annotations

import math

from protocol.errors import ErrorKind
from router.admission import Refuse, mib
from router.modelstate import Model, ModelStatus, Rejection


def backoff(m: Model, now: float) -> Rejection:
    """A model that failed to load and waits before the next attempt."""
    left = max(0.0, m.retry_at - now)
    reason = m.failure.message if m.failure else "unknown"
    return Rejection(ErrorKind.LOAD_FAILED,
                     f"model {m.name!r} failed to load {m.failures} time(s) in a row; "
                     f"next attempt in {left:.0f} s. Last error: {reason}", math.ceil(left))


def cannot_fit(m: Model, decision: Refuse, available: int, margin: int) -> Rejection:
    """A model that can never fit: pinned models hold every place, or memory is too small."""
    if not decision.memory:
        return Rejection(ErrorKind.UNAVAILABLE, f"model {m.name!r} cannot be loaded: {decision.reason}")
    need = m.estimate.describe() if m.estimate else f"about {mib(m.need)}"
    if m.last_rss > (m.estimate.total if m.estimate else 0):
        need = f"about {mib(m.last_rss)} (measured at its last load)"
    return Rejection(ErrorKind.UNAVAILABLE,
                     f"model {m.name!r} does not fit in memory: it needs {need}; "
                     f"{mib(max(0, available + margin))} is available and memory_margin_mb keeps "
                     f"{mib(margin)} free")


def stopped(m: Model, why: str) -> Rejection:
    """A model stopped while requests waited for it."""
    doing = "loading" if m.status is ModelStatus.LOADING else "waiting to load"
    return Rejection(ErrorKind.UNAVAILABLE, f"model {m.name!r} was {doing} and {why}")
