"""Where a proxied request enters: the routes whose answer comes from a model's worker.

The router reads the body once, peeks at `model` and `stream`, and hands the raw
bytes to an `Exchange` (router.exchange), which leases the model's worker and relays
the answer the worker renders, unchanged.

A streaming request with `X-Conversation-Id` is resumable: it is recorded in the
conversation tracker before its model loads (a newer request for the same id stops
the older one), and its client leaving detaches it instead of cancelling it.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

from protocol.errors import ErrorKind
from protocol.messages import STREAM_REPLACED, Endpoint
from router.asgi import ClientGone, decode, read_body
from router.auth import owner
from router.bridge import Bridge
from router.convs import REPLACED_WHILE_LOADING, Tracker, header_conversation_id, stream_key
from router.errors import HTTPError, send_error
from router.exchange import Exchange
from router.pool import Pool
from router.schema import Routed


class ProxiedRoute:
    """Pure ASGI app for one proxied route (chat, completions or embeddings)."""

    def __init__(self, endpoint: Endpoint, pool: Pool, bridge: Bridge, tracker: Tracker,
                 max_body: int, autoload: bool) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._bridge = bridge
        self._tracker = tracker
        self._max_body = max_body
        self._autoload = autoload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self._max_body)
            routed = decode(body, Routed)
            if not routed.model:
                raise HTTPError(ErrorKind.INVALID_REQUEST, "invalid request: `model` must not be empty",
                                "model")
            conv_id = header_conversation_id(scope) if self._endpoint is not Endpoint.EMBEDDING else None
        except HTTPError as exc:
            await exc.send(send)
            return
        except ClientGone:
            return
        if conv_id is not None and routed.stream:
            await self._resumable(scope, receive, send, body, routed.model, conv_id)
            return
        exchange = Exchange.proxied(self._pool, self._bridge, routed.model, self._endpoint, body,
                                    autoload=self._autoload)
        await exchange.run(send, receive)

    async def _resumable(self, scope: Scope, receive: Receive, send: Send, body: bytes,
                         model: str, conv_id: str) -> None:
        """A resumable POST: it holds its lease until the generation ends, so the model
        counts as busy meanwhile, whether or not its client stays."""
        if self._pool.resolve(model) is None:  # before the takeover: a typo must not stop a stream
            await send_error(send, ErrorKind.NOT_FOUND, f"model {model!r} not found", "model")
            return
        exchange = Exchange.proxied(self._pool, self._bridge, model, self._endpoint, body,
                                    autoload=self._autoload, stream_key=stream_key(owner(scope), conv_id))
        # Recorded before anything is awaited: a client coming back early is told to retry.
        conv, old = self._tracker.begin(conv_id, model, exchange)
        if old is not None:  # one live stream per conversation: the older one stops
            old.exchange.stop(STREAM_REPLACED, REPLACED_WHILE_LOADING)
        if await exchange.run(send, receive):
            self._tracker.finish(conv)
        else:  # no stream came of it (an error answer): nothing to resume
            self._tracker.remove(conv)
