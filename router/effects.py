"""What the scheduler asks to be done, as values: the pool (router.pool) carries them out."""

from __future__ import annotations

from dataclasses import dataclass

from router.modelstate import Rejection


@dataclass(frozen=True)
class EstimateMemory:
    model: str


@dataclass(frozen=True)
class StartLoad:
    model: str
    gen: int
    victims: tuple[str, ...] = ()  # stopped to make room, already gone


@dataclass(frozen=True)
class Stop:
    model: str
    gen: int
    grace: float
    reason: str


@dataclass(frozen=True)
class Grant:
    waiter: int
    model: str
    gen: int


@dataclass(frozen=True)
class Deny:
    waiter: int
    why: Rejection


@dataclass(frozen=True)
class Status:
    model: str


@dataclass(frozen=True)
class Log:
    level: int
    message: str


Effect = EstimateMemory | StartLoad | Stop | Grant | Deny | Status | Log
