"""The router's reader survives bad input on a real ZeroMQ socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import zmq

from protocol.codec import WorkerCodec
from protocol.errors import ErrorKind
from protocol.messages import PROTOCOL_VERSION, BodyChunk, Hello, ResponseEnd, ResponseHead, Upstream
from router.bridge import Bridge, Item, PeerUnreachable


def test_reader_survives_garbage_and_keeps_dispatching(tmp_path: Path) -> None:
    async def scenario() -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        bridge = Bridge()
        bridge.start(ctx, f"ipc://{tmp_path}/r.sock")
        got: list[Upstream] = []
        bridge.add_peer(b"w1", got.append)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, b"w1")
        dealer.connect(bridge.endpoint)
        codec = WorkerCodec()
        queue: asyncio.Queue[Item] = asyncio.Queue()
        req_id = bridge.open_stream(b"w1", queue.put_nowait)
        for bad in ([b""], [b"\xc1"], [msgspec.msgpack.encode({"t": "teleport"})],
                    codec.encode(BodyChunk(req_id)),          # payload frame missing
                    [b"a", b"b", b"c"]):
            dealer.send_multipart(bad)
        dealer.send_multipart(codec.encode(Hello(PROTOCOL_VERSION, 1, "w1")))
        dealer.send_multipart(codec.encode(ResponseHead(req_id, 200, "text/event-stream")))
        dealer.send_multipart(codec.encode(BodyChunk(req_id), b"data: x\n\n"))
        dealer.send_multipart(codec.encode(ResponseEnd(req_id)))
        items = [await asyncio.wait_for(queue.get(), 10) for _ in range(3)]
        assert [type(m) for m, _ in items] == [ResponseHead, BodyChunk, ResponseEnd]
        assert items[1][1] == b"data: x\n\n"
        assert got == [Hello(PROTOCOL_VERSION, 1, "w1")]
        # A request to a worker that is gone fails fast instead of vanishing.
        bridge.remove_peer(b"w1")
        try:
            bridge.send(b"w1", ResponseEnd(1))  # type: ignore[arg-type]
        except PeerUnreachable:
            pass
        else:
            raise AssertionError("send to a removed peer did not fail")
        assert bridge.fail_streams(b"w1", ErrorKind.WORKER_FAILED, "gone") == 1
        assert (await queue.get())[0].kind is ErrorKind.WORKER_FAILED  # type: ignore[union-attr]
        dealer.close(linger=0)
        await bridge.close()
        ctx.term()

    asyncio.run(scenario())
