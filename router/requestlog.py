"""What each request came to, for the access log and the metrics.

`RequestLogMiddleware` sits outermost: it gives every HTTP request a `RequestFacts`
(in the scope's state), notes the status it answered with, and once the app is done
hands the facts to every observer. The routes fill in what only they know: the model it
went to, when it was handed to its worker, and what the worker counted and timed
(`ResponseEnd`): tokens, time to the first token, time spent generating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.auth import key_name

log = logging.getLogger("modelherd.requests")

_FACTS = "modelherd.facts"


@dataclass
class RequestFacts:
    method: str
    path: str
    started: float  # time.monotonic()
    route: str = ""  # the route's path template ("" when none matched)
    status: int = 0  # 0: no answer was sent (the client left first)
    model: str = ""
    key_name: str = ""  # the key's name, never the key
    prompt_tokens: int = 0
    completion_tokens: int = 0
    streamed: bool = False
    dispatched: float | None = None  # monotonic time it was sent to its worker
    first_token_ms: float = 0.0  # the worker's: from receiving it to its first token
    predicted_ms: float = 0.0  # the worker's: from the first token to the last
    ended: float = 0.0

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from its arrival (queue and model load included) to its first token."""
        if self.dispatched is None or not self.completion_tokens:
            return None
        return self.dispatched - self.started + self.first_token_ms / 1e3

    @property
    def time_per_token(self) -> float | None:
        """Seconds per generated token after the first."""
        if self.completion_tokens < 2:
            return None
        return self.predicted_ms / 1e3 / (self.completion_tokens - 1)


Observer = Callable[[RequestFacts], None]


def facts_of(scope: Scope) -> RequestFacts | None:
    """The request's facts; None outside the middleware (an app built without it)."""
    facts = (scope.get("state") or {}).get(_FACTS)
    return facts if isinstance(facts, RequestFacts) else None


class RequestLogMiddleware:
    def __init__(self, app: ASGIApp, observers: Sequence[Observer]) -> None:
        self.app = app
        self._observers = observers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        facts = RequestFacts(scope["method"], scope["path"], time.monotonic())
        scope.setdefault("state", {})[_FACTS] = facts

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                facts.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            facts.ended = time.monotonic()
            route = scope.get("route")
            facts.route = getattr(route, "path", "") if route is not None else ""
            facts.key_name = key_name(scope)
            for observe in self._observers:
                try:
                    observe(facts)
                except Exception:  # an observer's bug must not fail the request it observes
                    log.exception("request observer %r failed", observe)
