"""Limits on what a client connection may cost before its request reaches the app: the size
of a request head, the time to send it, and the number of connections open at once; and
malformed HTTP answered with the API's JSON error instead of uvicorn's text/plain 400.

uvicorn's httptools protocol has none of these limits (h11_max_incomplete_event_size
applies to its h11 protocol only; httptools joins a header's pieces without bound: one
unfinished 86 MiB header took the router's peak RSS from 40 to 211 MiB), and its
`limit_concurrency` answers 503 to every new request once that many connections are open,
so a thousand idle sockets would lock everyone out. `guarded_protocol` returns a small
subclass of uvicorn's HttpToolsProtocol, passed to uvicorn through `Config(http=...)`:

- request head (request line and headers) over `max_header_bytes`: 431;
- a head not whole `header_timeout` seconds after the connection opened (or after the
  request's first byte, on a kept-alive connection): 408 if part of one came, then closed;
- more than `max_connections` open: the connection that has waited longest for a request
  head (or sat idle between requests) is closed to make room, as those cost nothing to
  drop; when every connection is busy with a request, the new one gets a 503;
- a request httptools cannot parse: 400.

Each answer is the OpenAI-shaped error body with `Connection: close`. After a 400, 431 or
503 the connection half-closes and drops what the client still sends for `LINGER_S`, so
the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from protocol.errors import ErrorKind, error_body

LINGER_S = 1.0
# File descriptors the daemon needs beyond its client connections: listening and ZeroMQ
# sockets, worker pipes, model and cache files.
FD_HEADROOM = 256


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    header_timeout: float
    max_connections: int


class Connections:
    """The open connections of one server, and those waiting for a request head in the
    order they began to wait: the first is the first to close when room is needed."""

    def __init__(self) -> None:
        self.open: set[GuardedHttpToolsProtocol] = set()
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}  # insertion-ordered

    def forget(self, conn: GuardedHttpToolsProtocol) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[Limits]
    connections_of_server: ClassVar[Connections]

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._in_head = True  # bytes that arrive now belong to a request head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._done = False  # answered with an error, or dropped: nothing more is parsed

    # ---- connection lifecycle ---------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        registry = self.connections_of_server
        registry.open.add(self)
        if len(registry.open) > self.limits.max_connections:
            oldest = next(iter(registry.waiting), None)
            if oldest is None:
                self._refuse(503, ErrorKind.UNAVAILABLE, "the server has too many open connections "
                             f"(max_connections = {self.limits.max_connections}); retry shortly",
                             retry_after=1)
                return
            oldest._drop()
        registry.waiting[self] = None
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections_of_server.forget(self)
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return  # lingering after an error answer: what the client still sends is dropped
        if not self._in_head:
            super().data_received(data)
            return
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Parse only up to the limit, so httptools never holds more than that of a head.
        self._head_bytes += room
        if room:
            super().data_received(data[:room])
        if self._done or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(431, ErrorKind.TOO_LARGE, "the request's headers are larger than the limit "
                         f"of {self.limits.max_header_bytes} bytes")
            return
        self.data_received(data[room:])  # the head ended in time: the rest is a body or the next request

    # ---- parser callbacks: where a request head begins and ends ----------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a kept-alive connection's next request: its clock starts now
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.connections_of_server.waiting.pop(self, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)
        super().on_response_complete()
        if not pipelined and not self._done and not self.transport.is_closing():
            self.connections_of_server.waiting[self] = None  # idle until its next request

    # ---- answers ---------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except HttpParserError`; a failed callback's own error
        # is chained as the context, and the parser's message then says only "User callback error".
        exc = sys.exception()
        reason = f": {exc}" if exc is not None and exc.__context__ is None and str(exc) else ""
        self._refuse(400, ErrorKind.INVALID_REQUEST, f"malformed HTTP request{reason}")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self._drop()  # it asked nothing: there is nothing to answer
            return
        self._refuse(408, ErrorKind.INVALID_REQUEST, "the request's head did not arrive within "
                     f"{self.limits.header_timeout:g} s", linger=False)

    def _refuse(self, status: int, kind: ErrorKind, message: str, retry_after: int | None = None,
                linger: bool = True) -> None:
        """Answer `status` with the JSON error and close; a response already under way is
        cut instead (a second status line would corrupt it)."""
        if self._done:
            return
        self._done = True
        self.connections_of_server.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # its app task sees the client gone and writes nothing more
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        body = error_body(kind, message)
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        if retry_after is not None:
            headers.append((b"retry-after", str(retry_after).encode()))
        self.transport.write(b"".join([STATUS_LINE[status], *(b"%s: %s\r\n" % h for h in headers),
                                       b"\r\n", body]))
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.flow.resume_reading()
            self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _drop(self) -> None:
        """Close without an answer (made room for a newer connection, or asked nothing in time)."""
        self._done = True
        self.connections_of_server.forget(self)  # it no longer counts, though closing takes a moment
        self.transport.close()


def guarded_protocol(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for one uvicorn server: `limits`, and its own set of connections."""

    class Guarded(GuardedHttpToolsProtocol):
        pass

    Guarded.limits = limits
    Guarded.connections_of_server = Connections()
    return Guarded


def raise_fd_limit(max_connections: int) -> str | None:
    """Lift the soft limit on open files to what `max_connections` needs (systemd's default
    soft limit is 1024, under the hard one); a warning when the hard limit is lower."""
    want = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        return (f"max_connections = {max_connections} needs about {want} open files, and the limit is "
                f"{new} (LimitNOFILE= under systemd): connections past it wait to be accepted")
    return None
