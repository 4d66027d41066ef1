"""Where a proxied request enters: the routes whose answer comes from a model's worker.

The router reads the body once, peeks at what it routes on (`model`, `stream`, and for
the Responses API `previous_response_id`), and hands the raw bytes to an `Exchange`
(router.exchange), which leases the model's worker and relays the answer the worker
renders, unchanged. A request without `model` goes to the default model: the one the
config names, or the only model there is (as llama-server does). GET routes (/props,
/slots) name the model in the query string.

A streaming request with `X-Conversation-Id` is resumable: it is recorded in the
conversation tracker before its model loads (a newer request for the same id stops
the older one), and its client leaving detaches it instead of cancelling it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import QueryParams
from starlette.types import Receive, Scope, Send

from protocol.errors import Dialect, ErrorKind
from protocol.messages import STREAM_REPLACED, Endpoint, StoredTurn
from router.asgi import ClientGone, decode, read_body
from router.auth import may_use, owner
from router.bridge import Bridge
from router.convs import REPLACED_WHILE_LOADING, Tracker, header_conversation_id, stream_key
from router.errors import HTTPError, send_error
from router.exchange import Exchange
from router.pool import Pool
from router.requestlog import facts_of
from router.responses_store import ResponseStore
from router.schema import Routed

# Endpoints whose answers may stream and so may be resumed with X-Conversation-Id.
_STREAMING = frozenset({Endpoint.CHAT, Endpoint.COMPLETION, Endpoint.NATIVE_COMPLETION, Endpoint.INFILL,
                        Endpoint.RESPONSES, Endpoint.MESSAGES})


@dataclass(frozen=True)
class RouteSpec:
    endpoint: Endpoint
    dialect: Dialect = Dialect.OPENAI
    model_in_query: bool = False  # a GET: ?model=NAME (and ?autoload=)


class ProxiedRoute:
    """Pure ASGI app for one proxied route."""

    def __init__(self, spec: RouteSpec, pool: Pool, bridge: Bridge, tracker: Tracker,
                 responses: ResponseStore, max_body: int, autoload: bool,
                 default_model: Callable[[], str | None], window: int = 0) -> None:
        self._spec = spec
        self._pool = pool
        self._bridge = bridge
        self._tracker = tracker
        self._responses = responses
        self._max_body = max_body
        self._autoload = autoload
        self._default_model = default_model
        self._window = window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self._spec
        autoload = self._autoload
        try:
            if spec.model_in_query:
                params = QueryParams(scope["query_string"])
                body, routed = b"", Routed(params.get("model", ""))
                if "autoload" in params:  # llama-server: ?autoload=true|1 loads, anything else not
                    autoload = params["autoload"] in ("true", "1")
            else:
                body = await read_body(scope, receive, self._max_body)
                routed = decode(body, Routed)
            model = routed.model or self._default_model()
            if not model:
                raise HTTPError(ErrorKind.INVALID_REQUEST, "model name is missing from the request "
                                "(more than one model is configured and none is the default)", "model")
            resolved = self._pool.resolve(model)
            if resolved is not None and not may_use(scope, resolved):  # it does not exist for this key
                raise HTTPError(ErrorKind.NOT_FOUND, f"model {model!r} not found", "model")
            stream = bool(routed.stream) and spec.endpoint in _STREAMING
            conv_id = header_conversation_id(scope) if stream else None
            history = self._responses.history(owner(scope), routed.previous_response_id)
        except HTTPError as exc:
            await exc.send(send, spec.dialect)
            return
        except ClientGone:
            return
        if conv_id is not None:
            await self._resumable(scope, receive, send, body, model, conv_id, autoload, history,
                                  routed.previous_response_id)
            return
        exchange = Exchange.proxied(self._pool, self._bridge, model, spec.endpoint, body, autoload=autoload,
                                    dialect=spec.dialect, history=history, window=self._window,
                                    facts=facts_of(scope))
        await exchange.run(send, receive)
        self._keep(scope, exchange, routed.previous_response_id)

    async def _resumable(self, scope: Scope, receive: Receive, send: Send, body: bytes, model: str,
                         conv_id: str, autoload: bool, history: list[StoredTurn],
                         previous: str | None) -> None:
        """A resumable POST: it holds its lease until the generation ends, so the model
        counts as busy meanwhile, whether or not its client stays."""
        spec = self._spec
        if self._pool.resolve(model) is None:  # before the takeover: a typo must not stop a stream
            await send_error(send, ErrorKind.NOT_FOUND, f"model {model!r} not found", "model",
                             dialect=spec.dialect)
            return
        exchange = Exchange.proxied(self._pool, self._bridge, model, spec.endpoint, body, autoload=autoload,
                                    stream_key=stream_key(owner(scope), conv_id), dialect=spec.dialect,
                                    history=history, window=self._window, facts=facts_of(scope))
        # Recorded before anything is awaited: a client coming back early is told to retry.
        conv, old = self._tracker.begin(conv_id, model, exchange)
        if old is not None:  # one live stream per conversation: the older one stops
            old.exchange.stop(STREAM_REPLACED, REPLACED_WHILE_LOADING)
        if await exchange.run(send, receive):
            self._tracker.finish(conv)
        else:  # no stream came of it (an error answer): nothing to resume
            self._tracker.remove(conv)
        self._keep(scope, exchange, previous)

    def _keep(self, scope: Scope, exchange: Exchange, previous: str | None) -> None:
        if exchange.stored is not None:
            self._responses.put(owner(scope), exchange.stored.response_id, exchange.stored.turn, previous)
