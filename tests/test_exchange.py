"""One request's life in-process: an Exchange against a fake pool, a fake bridge and a fake
client, for every ordering of its client leaving, a DELETE, a takeover, its worker dying
and its worker finishing. No sockets, no processes, no clock."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from protocol.errors import ErrorKind
from protocol.messages import (
    BodyChunk,
    Cancel,
    Detach,
    Downstream,
    Endpoint,
    Request,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    StreamDelete,
)
from router.bridge import Deliver, PeerUnreachable
from router.convs import REPLACED_WHILE_LOADING, Tracker
from router.exchange import Exchange, Phase
from router.pool import PoolError

SSE = "text/event-stream"


class Worker:
    def __init__(self, identity: bytes = b"m/w1") -> None:
        self.identity = identity
        self.alive = True

    def gone_error(self) -> tuple[ErrorKind, str]:
        return ErrorKind.WORKER_FAILED, "the worker serving 'm' exited (killed by SIGKILL)"


class Bridge:
    """Records what goes to workers; the test delivers what comes back."""

    def __init__(self) -> None:
        self.sent: list[Downstream] = []
        self.open: dict[int, tuple[bytes, Deliver]] = {}
        self.unreachable = False
        self._ids = itertools.count(1)

    def open_stream(self, identity: bytes, deliver: Deliver) -> int:
        req_id = next(self._ids)
        self.open[req_id] = (identity, deliver)
        return req_id

    def close_stream(self, req_id: int) -> None:
        self.open.pop(req_id, None)

    def send(self, identity: bytes, msg: Downstream, payload: bytes | None = None) -> None:
        if self.unreachable:
            raise PeerUnreachable("gone")
        self.sent.append(msg)

    def tell(self, identity: bytes, msg: Downstream) -> None:
        self.sent.append(msg)

    def deliver(self, req_id: int, msg: Any, payload: bytes | None = None) -> None:
        if req_id in self.open:
            self.open[req_id][1]((msg, payload))

    def fail_streams(self, kind: ErrorKind, message: str) -> None:
        for req_id, (_, deliver) in list(self.open.items()):
            deliver((ResponseError(req_id, kind, message), None))

    def kinds(self) -> list[str]:
        return [type(m).__name__ for m in self.sent]


class Pool:
    """Hands out tickets; the test grants or denies them."""

    def __init__(self) -> None:
        self.notify: dict[int, Callable[[Any], None]] = {}
        self.released: list[int] = []
        self._tickets = itertools.count(1)

    def request(self, name: str, notify: Callable[[Any], None], *, autoload: bool = True) -> int:
        ticket = next(self._tickets)
        self.notify[ticket] = notify
        return ticket

    def release(self, ticket: int) -> None:
        self.released.append(ticket)

    def grant(self, worker: Worker, ticket: int = 1) -> None:
        self.notify[ticket](worker)


class Client:
    """The ASGI side: what was sent to it, and a receive() that reports its leaving."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.after_leave: list[dict[str, Any]] = []
        self.left = False
        self._gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        (self.after_leave if self.left else self.messages).append(message)

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.left = True
        self._gone.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


async def turns(n: int = 20) -> None:
    """Let every ready task run until it waits again: turns of the loop, not a clock."""
    loop = asyncio.get_running_loop()
    for _ in range(n):
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def make(resumable: bool) -> tuple[Exchange, Pool, Bridge, Client]:
    pool, bridge, client = Pool(), Bridge(), Client()
    exchange = Exchange.proxied(pool, bridge, "m", Endpoint.CHAT, b"{}", autoload=True,  # type: ignore[arg-type]
                                stream_key="owner/conv" if resumable else None)
    return exchange, pool, bridge, client


async def start(exchange: Exchange, client: Client) -> asyncio.Task[bool]:
    """Run it until it waits for its model."""
    task = asyncio.create_task(exchange.run(client.send, client.receive))
    await turns()
    return task


def stream_answer(bridge: Bridge, req_id: int = 1, end: bool = True) -> None:
    bridge.deliver(req_id, ResponseHead(req_id, 200, SSE))
    bridge.deliver(req_id, BodyChunk(req_id), b"data: one\n\n")
    bridge.deliver(req_id, BodyChunk(req_id), b"data: two\n\n")
    if end:
        bridge.deliver(req_id, BodyChunk(req_id), b"data: [DONE]\n\n")
        bridge.deliver(req_id, ResponseEnd(req_id))


# ---- each path once ---------------------------------------------------------------------


def test_a_granted_request_streams_its_answer_and_releases_its_lease() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        await turns()
        assert exchange.phase is Phase.WAITING and bridge.sent == []
        pool.grant(Worker())
        await turns()
        assert bridge.sent == [Request(1, Endpoint.CHAT, None)] and exchange.phase is Phase.RUNNING
        stream_answer(bridge)
        assert await task is True
        assert client.status == 200 and client.body == b"data: one\n\ndata: two\n\ndata: [DONE]\n\n"
        assert pool.released == [1] and bridge.open == {} and exchange.phase is Phase.DONE
    run(scenario)


def test_chunks_that_queued_up_go_out_in_one_write() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        stream_answer(bridge)  # all delivered before the exchange runs again
        await task
        bodies = [m["body"] for m in client.messages if m["type"] == "http.response.body"]
        assert bodies == [b"data: one\n\ndata: two\n\ndata: [DONE]\n\n", b""]
    run(scenario)


def test_a_json_answer_is_sent_whole_with_its_length() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        bridge.deliver(1, ResponseHead(1, 200, "application/json"))
        bridge.deliver(1, BodyChunk(1), b'{"a":')
        bridge.deliver(1, BodyChunk(1), b"1}")
        bridge.deliver(1, ResponseEnd(1))
        assert await task is False
        assert client.status == 200 and (b"content-length", b"7") in client.messages[0]["headers"]
        assert client.body == b'{"a":1}'
    run(scenario)


def test_a_denied_request_gets_the_pools_error() -> None:
    async def scenario() -> None:
        exchange, pool, _, client = make(resumable=False)
        task = await start(exchange, client)
        pool.notify[1](PoolError(ErrorKind.RATE_LIMITED, "model 'm' already has 32 requests", 1))
        assert await task is False
        assert client.status == 429 and (b"retry-after", b"1") in client.messages[0]["headers"]
        assert json.loads(client.body)["error"]["type"] == "rate_limit_error"
    run(scenario)


def test_a_worker_gone_before_the_request_reached_it_is_a_502() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        bridge.unreachable = True
        task = await start(exchange, client)
        pool.grant(Worker())
        assert await task is False
        assert client.status == 502 and b"killed by SIGKILL" in client.body
        assert pool.released == [1]
    run(scenario)


def test_a_plain_client_leaving_the_queue_leaves_it_and_sends_nothing() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        await turns()
        client.leave()
        assert await task is False
        assert pool.released == [1] and bridge.sent == [] and client.messages == []
    run(scenario)


def test_a_plain_client_leaving_mid_stream_cancels_the_work() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        stream_answer(bridge, end=False)
        await turns()
        client.leave()
        assert await task is True
        assert bridge.kinds() == ["Request", "Cancel"] and bridge.sent[1] == Cancel(1)
        assert pool.released == [1] and bridge.open == {}
    run(scenario)


def test_a_resumable_client_leaving_the_queue_detaches_once_its_model_is_ready() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=True)
        task = await start(exchange, client)
        await turns()
        client.leave()
        await turns()
        assert not task.done() and pool.released == []  # it waits on, for its stream
        pool.grant(Worker())
        await turns()
        assert bridge.sent == [Request(1, Endpoint.CHAT, "owner/conv"), Detach(1)]
        stream_answer(bridge)
        assert await task is True
        assert client.messages == [] and client.after_leave == [] and pool.released == [1]
    run(scenario)


def test_a_resumable_client_leaving_mid_stream_detaches_and_the_lease_is_held_to_the_end() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=True)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        bridge.deliver(1, ResponseHead(1, 200, SSE))
        await turns()
        client.leave()
        await turns()
        assert bridge.sent[-1] == Detach(1) and pool.released == [] and not exchange.attached
        bridge.deliver(1, BodyChunk(1), b"data: later\n\n")
        bridge.deliver(1, ResponseEnd(1))
        assert await task is True
        assert client.after_leave == [] and pool.released == [1]
    run(scenario)


def test_a_stop_while_waiting_answers_400_with_the_reason() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=True)
        task = await start(exchange, client)
        await turns()
        exchange.stop("its conversation's stream was deleted", "request cancelled by a stop")
        assert await task is False
        assert client.status == 400
        assert json.loads(client.body)["error"]["message"] == "request cancelled by a stop"
        assert pool.released == [1] and bridge.sent == []
        assert exchange.stop_reason == "request cancelled by a stop"
    run(scenario)


def test_a_stop_while_running_deletes_the_stream_on_its_worker() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=True)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        stream_answer(bridge, end=False)
        await turns()
        exchange.stop("deleted", "cancelled")
        await turns()
        assert bridge.sent[-1] == StreamDelete(0, ["owner/conv"], "deleted")
        # The worker ends the stream, telling the attached client why.
        bridge.deliver(1, BodyChunk(1), b'data: {"error": "deleted"}\n\n')
        bridge.deliver(1, ResponseEnd(1))
        assert await task is True
        assert client.body.endswith(b'data: {"error": "deleted"}\n\n')
    run(scenario)


def test_a_stop_after_the_end_frees_the_workers_copy() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=True)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        stream_answer(bridge)
        await task
        exchange.stop("deleted", "cancelled")
        assert bridge.sent[-1] == StreamDelete(0, ["owner/conv"], "deleted")
    run(scenario)


def test_a_worker_dying_mid_stream_ends_it_with_an_error_event() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        stream_answer(bridge, end=False)
        await turns()
        bridge.fail_streams(ErrorKind.WORKER_FAILED, "the worker exited (killed by SIGKILL)")
        assert await task is True
        assert b'"type":"server_error"' in client.body and b"killed by SIGKILL" in client.body
        assert pool.released == [1]
    run(scenario)


def test_a_worker_dying_before_its_head_is_a_502() -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable=False)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        bridge.fail_streams(ErrorKind.WORKER_FAILED, "the worker exited")
        assert await task is False
        assert client.status == 502
    run(scenario)


def test_a_takeover_stops_the_older_exchange_of_the_conversation() -> None:
    async def scenario() -> None:
        tracker = Tracker(10, 300)
        old, pool, bridge, client = make(resumable=True)
        old_task = await start(old, client)
        tracker.begin("conv", "m", old)
        await turns()
        new = Exchange.proxied(pool, bridge, "m", Endpoint.CHAT, b"{}", autoload=True,  # type: ignore[arg-type]
                               stream_key="owner/conv")
        conv, replaced = tracker.begin("conv", "m", new)
        assert replaced is not None and replaced.exchange is old and conv.exchange is new
        replaced.exchange.stop("a newer request took over", REPLACED_WHILE_LOADING)
        assert await old_task is False
        assert json.loads(client.body)["error"]["message"] == REPLACED_WHILE_LOADING
    run(scenario)


# ---- every ordering ----------------------------------------------------------------------

EVENTS = ("leave", "delete", "die", "finish")


@pytest.mark.parametrize("order", list(itertools.permutations(EVENTS)), ids="-".join)
@pytest.mark.parametrize("resumable", [True, False], ids=["resumable", "plain"])
def test_every_ordering_ends_once_and_nothing_reaches_a_client_that_left(
        order: tuple[str, ...], resumable: bool) -> None:
    async def scenario() -> None:
        exchange, pool, bridge, client = make(resumable)
        task = await start(exchange, client)
        pool.grant(Worker())
        await turns()
        bridge.deliver(1, ResponseHead(1, 200, SSE))
        bridge.deliver(1, BodyChunk(1), b"data: first\n\n")
        await turns()
        ended = False  # the worker sent its end (or the bridge failed the request)
        for event in order:
            if event == "leave":
                client.leave()
            elif event == "delete":
                exchange.stop("deleted", "cancelled")
                await turns()
                if not ended and resumable and not task.done():  # the worker ends the stream, saying why
                    bridge.deliver(1, BodyChunk(1), b'data: {"error": "deleted"}\n\n')
                    bridge.deliver(1, ResponseEnd(1))
                    ended = True
            elif event == "die" and not ended:
                bridge.fail_streams(ErrorKind.WORKER_FAILED, "exited")
                ended = True
            elif event == "finish" and not ended:
                bridge.deliver(1, BodyChunk(1), b"data: [DONE]\n\n")
                bridge.deliver(1, ResponseEnd(1))
                ended = True
            await turns()
        assert await task is True
        assert pool.released == [1] and bridge.open == {} and exchange.phase is Phase.DONE
        assert client.after_leave == []
        told = bridge.kinds()
        assert told[0] == "Request" and told.count("Detach") <= 1 and told.count("Cancel") <= 1
        if resumable:
            assert "Cancel" not in told  # a resumable stream is never cancelled by its client
        else:
            assert "Detach" not in told
        body = client.body
        assert body.count(b"[DONE]") + body.count(b'"error"') <= 1  # one end, and nothing after it
        if order.index("leave") == 0:
            assert body == b"data: first\n\n"  # left before anything else happened
    run(scenario)
