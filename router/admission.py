"""Who makes room for a model: the admission decision as a pure function.

Given the models that hold a place in the pool, the `max_models` cap and the memory
that is free, `plan` says whether a model may start loading now (and which idle
models to evict first, least recently used first), must wait for a busy model to
become idle, or can never fit. No processes, no clock, no I/O: the pool calls it
with a snapshot and applies the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1024 * 1024


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n < 10 * MIB else f"{n // MIB} MiB"


@dataclass(frozen=True)
class Estimate:
    """What a model will take, read from its files before any worker starts."""

    weights: int
    kv_cache: int  # every slot's: parallel x n_ctx
    overhead: int
    prompt_cache: int = 0  # the bound of the host-RAM cache of idle conversations (cache_ram_mb)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead + self.prompt_cache

    def describe(self) -> str:
        cache = f", prompt cache up to {mib(self.prompt_cache)}" if self.prompt_cache else ""
        return (f"about {mib(self.total)} (weights {mib(self.weights)}, KV cache "
                f"{mib(self.kv_cache)}{cache}, process {mib(self.overhead)})")


@dataclass(frozen=True)
class Holder:
    """A model that occupies a place: loading, loaded or on its way out."""

    name: str
    evictable: bool  # loaded, nothing in flight or waiting, not pinned
    pinned: bool
    last_used: float
    footprint: int  # bytes it gives back when it stops


@dataclass(frozen=True)
class Admit:
    victims: tuple[str, ...]  # to stop before the load starts, in eviction order


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Refuse:
    reason: str
    memory: bool  # True: it cannot fit in memory; False: pinned models fill every place


Decision = Admit | Wait | Refuse


def plan(need: int, holders: Sequence[Holder], max_models: int, available: int | None) -> Decision:
    """Decide for one model needing `need` bytes; `available` is None when memory is not
    checked, `max_models` 0 means no cap."""
    slots_short = len(holders) + 1 - max_models if max_models > 0 else 0
    bytes_short = need - available if available is not None else 0
    victims: list[str] = []
    for holder in sorted((h for h in holders if h.evictable), key=lambda h: (h.last_used, h.name)):
        if slots_short <= 0 and bytes_short <= 0:
            break
        victims.append(holder.name)
        slots_short -= 1
        bytes_short -= holder.footprint
    if slots_short <= 0 and bytes_short <= 0:
        return Admit(tuple(victims))
    # Not now. Could it ever, once every model that is not pinned has gone?
    pinned = [h for h in holders if h.pinned]
    if max_models > 0 and len(pinned) + 1 > max_models:
        return Refuse(f"all {max_models} places (max_models) are held by pinned models", memory=False)
    if available is not None:
        reclaimable = sum(h.footprint for h in holders if not h.pinned)
        if need > available + reclaimable:
            return Refuse(f"it needs about {need // MIB} MiB and at most "
                          f"{max(0, available + reclaimable) // MIB} MiB can be made available",
                          memory=True)
    busy = sorted(h.name for h in holders if not h.evictable and not h.pinned)
    what = "max_models is reached" if slots_short > 0 else "memory is short"
    return Wait(f"{what}; waiting for one of {', '.join(busy)} to become idle")
