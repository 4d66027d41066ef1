"""The benches' raw-socket HTTP/1.1 client: one keep-alive connection that sends a prepared
request and reads its chunked SSE response, plus the request builder and HttpError.

Raw sockets rather than httpx so the client side costs little CPU: on a 2-core machine the
client competes with the router and the workers it is measuring."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any

CONTENT = b'"delta":{"content":"'
ERROR_EVENT = b'data: {"error"'
DONE = b"data: [DONE]"


class HttpError(Exception):
    """A response the client counts as an error (status, error event, truncated stream)."""


@dataclass
class Reply:
    """One complete 200 SSE stream."""

    ttft: float  # seconds to the first content token
    ttlb: float  # seconds to the end of the body
    tokens: int  # completion tokens, from the usage event
    events: list[bytes]  # the chunks' payloads

    @property
    def body(self) -> bytes:  # joined on demand: most callers only need the numbers
        """The SSE bytes, as a resume replays them."""
        return b"".join(self.events)


def post_json(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one POST with a JSON body, built once and sent as often as needed."""
    data = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(data)}\r\n\r\n").encode() + data


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 with a minimal chunked/SSE reader."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.sock = self._connect()
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def reconnect(self) -> None:  # the connection's state is unknown after an error
        self.sock.close()
        self.sock = self._connect()
        self.buf.clear()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def _take_until(self, sep: bytes) -> bytes:
        while (at := self.buf.find(sep)) < 0:
            self._fill()
        out = bytes(self.buf[:at])
        del self.buf[:at + len(sep)]
        return out

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def stream(self, request: bytes) -> Reply:
        """Send one streaming request and read it to its end; raise HttpError unless it is a
        200 SSE stream ending in a usage event and [DONE]."""
        t0 = time.perf_counter()
        self.sock.sendall(request)
        head = self._take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        if headers.get("transfer-encoding", "").lower() != "chunked":
            body = self._take(int(headers.get("content-length", "0")))
            raise HttpError(f"HTTP {status}: {body[:300]!r}")
        first = 0.0
        events: list[bytes] = []
        while True:
            size = int(self._take_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._take_until(b"\r\n")  # no trailers: the empty line ending the body
                break
            data = self._take(size + 2)[:-2]
            if not first:  # an empty content delta (the role chunk) is not a token
                at = data.find(CONTENT)
                if at >= 0 and data[at + len(CONTENT): at + len(CONTENT) + 1] != b'"':
                    first = time.perf_counter() - t0
            events.append(data)
        ttlb = time.perf_counter() - t0
        if status != 200:
            raise HttpError(f"HTTP {status}: {b''.join(events)[:300]!r}")
        # Only the end of the stream is parsed: the usage event, [DONE], or an error event.
        tail = b"".join(events[-4:])
        if (at := tail.find(ERROR_EVENT)) >= 0:
            raise HttpError(f"error event: {tail[at:][:300]!r}")
        if not tail.rstrip().endswith(DONE):
            raise HttpError(f"stream ended without [DONE]: {tail[-300:]!r}")
        tokens = completion_tokens(tail)
        if tokens is None:
            raise HttpError(f"no usage in the last event: {tail[-300:]!r}")
        return Reply(first or ttlb, ttlb, tokens, events)


def completion_tokens(sse_tail: bytes) -> int | None:
    """The usage event's completion_tokens, from the end of an SSE body (the one event
    that has the field; usage nests objects, so it is not cut out by brace matching)."""
    at = sse_tail.rfind(b'"usage":{')
    if at < 0:
        return None
    start = sse_tail.rfind(b"data: ", 0, at) + len(b"data: ")
    return int(json.loads(sse_tail[start: sse_tail.index(b"\n", at)])["usage"]["completion_tokens"])
