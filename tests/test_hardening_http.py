"""The HTTP front door under abuse, with real sockets against the real daemon: request heads
bounded in size and time, open connections bounded in number, malformed HTTP answered in
the API's JSON error shape, and HEAD /models/sse ending like any other HEAD."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.daemon import Daemon

HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 32
SLOW_CONNECTIONS = 200
HEAD_START = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _config(tmp: Path, **server: object) -> Path:
    lines = "\n".join(f"{key} = {json.dumps(value)}" for key, value in server.items())
    path = tmp / "c.toml"
    path.write_text(f"[server]\nmodels_dirs = []\n{lines}\n")
    return path


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, isolated_env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon that gives a request head one second."""
    config = _config(tmp_path_factory.mktemp("quick"), header_timeout=HEADER_TIMEOUT_S)
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, isolated_env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon with few connections allowed and the default (long) header timeout."""
    config = _config(tmp_path_factory.mktemp("capped"), max_connections=MAX_CONNECTIONS)
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


# ---- raw HTTP helpers --------------------------------------------------------------------

def connect(d: Daemon, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", d.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; a socket timeout fails the test."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; got {received[:300]!r}") from None
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no whole response head in {raw[:300]!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def assert_json_error(raw: bytes, status: int, code: str) -> dict[str, Any]:
    got, headers, body = parse(raw)
    assert got == status, raw[:500]
    assert headers["content-type"] == "application/json", headers
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    return error  # type: ignore[no-any-return]


def peak_rss(d: Daemon) -> int:
    """The router process's high-water mark of resident memory, in bytes."""
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def open_connections(d: Daemon) -> int:
    assert d.proc is not None
    return sum(1 for c in psutil.Process(d.proc.pid).net_connections("tcp")
               if c.laddr and c.laddr.port == d.port and c.status == psutil.CONN_ESTABLISHED)


def health_latency(d: Daemon) -> float:
    """Seconds for GET /health on a new connection."""
    started = time.monotonic()
    r = httpx.get(d.url + "/health", timeout=10)
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    return elapsed


# ---- header size -------------------------------------------------------------------------

def test_an_oversized_header_gets_431_in_json_and_memory_stays_bounded(quick: Daemon) -> None:
    health_latency(quick)  # warm: the first request's allocations are not the header's
    before = peak_rss(quick)
    sent = 0
    with connect(quick) as sock:
        sock.sendall(HEAD_START)
        piece = b"a" * (1 << 20)
        try:
            while sent < 16 << 20:  # 16 MiB of one header, never finished
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped listening: what it answered is still to be read
        error = assert_json_error(read_until_closed(sock), 431, "too_large")
    assert "header" in error["message"]
    grown = peak_rss(quick) - before
    # Before the limit the router kept the whole header, about twice over (httptools joins the pieces).
    assert grown < 8 << 20, f"the router grew by {grown >> 20} MiB on a {sent >> 20} MiB header"
    assert health_latency(quick) < 1.0


def test_a_large_but_allowed_header_still_works(quick: Daemon) -> None:
    with connect(quick) as sock:
        sock.sendall(HEAD_START + b"b" * 32_000 + b"\r\nConnection: close\r\n\r\n")
        status, _, body = parse(read_until_closed(sock))
    assert status == 200 and json.loads(body)["status"] == "ok"
    # A head just under the limit and its body in one send: the body past the limit's offset
    # still reaches the route whole (it answers about the body's model).
    payload = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x" * 20_000}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\nX-Pad: ").encode()
    head += b"p" * (64 * 1024 - len(head) - 4) + b"\r\n\r\n"
    with connect(quick) as sock:
        sock.sendall(head + payload.encode())
        raw = read_until_closed(sock)
    assert "no-such-model" in assert_json_error(raw, 404, "not_found")["message"]


def test_the_limits_are_server_keys_with_sane_defaults(tmp_path: Path) -> None:
    from router.config import ConfigError, ServerSection, load_file

    server = ServerSection()
    assert (server.max_header_bytes, server.header_timeout, server.max_connections) == (65536, 10.0, 1024)
    for bad in ("max_header_bytes = 100", "header_timeout = 0", "max_connections = 0"):
        (tmp_path / "c.toml").write_text(f"[server]\n{bad}\n")
        with pytest.raises(ConfigError, match=bad.split()[0]):
            load_file(tmp_path / "c.toml")


# ---- malformed HTTP ----------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",  # a control byte in a header value
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
], ids=["control-byte", "negative-length", "bad-chunk", "bad-version"])
def test_malformed_http_gets_a_json_400(quick: Daemon, request_bytes: bytes) -> None:
    with connect(quick) as sock:
        sock.sendall(request_bytes)
        raw = read_until_closed(sock)
    error = assert_json_error(raw, 400, "invalid_request")
    assert error["type"] == "invalid_request_error"
    assert parse(raw)[1]["connection"] == "close"


# ---- HEAD /models/sse --------------------------------------------------------------------

def test_head_on_the_event_feed_answers_headers_and_ends(quick: Daemon) -> None:
    with connect(quick) as sock:
        # Both requests at once: the GET is answered only once the HEAD's response has ended.
        sock.sendall(b"HEAD /models/sse HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = read_until_closed(sock)
    head, _, rest = raw.partition(b"\r\n\r\n")
    status, headers, _ = parse(head + b"\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "transfer-encoding" not in headers
    status, _, body = parse(rest)
    assert status == 200 and json.loads(body)["status"] == "ok"


# ---- header time -------------------------------------------------------------------------

def test_a_connection_that_does_not_finish_its_head_is_closed(quick: Daemon) -> None:
    with ExitStack() as stack:
        partial = [stack.enter_context(connect(quick)) for _ in range(3)]
        idle = stack.enter_context(connect(quick))  # sends nothing at all
        for sock in partial:
            sock.sendall(HEAD_START + b"trickle")
        started = time.monotonic()
        for sock in partial:  # each is told why, then closed
            assert_json_error(read_until_closed(sock), 408, "invalid_request")
        assert read_until_closed(idle) == b""  # nothing asked: nothing to answer
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 5
    assert health_latency(quick) < 1.0


def test_a_kept_alive_connections_next_head_has_the_same_deadline(quick: Daemon) -> None:
    with connect(quick) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(HEAD_START)  # the next request starts, and stalls
        assert_json_error(read_until_closed(sock), 408, "invalid_request")


# ---- connection count --------------------------------------------------------------------

def test_health_stays_fast_while_slow_connections_pile_up(capped: Daemon) -> None:
    with ExitStack() as stack:
        slow = []
        for _ in range(SLOW_CONNECTIONS):
            sock = stack.enter_context(connect(capped))
            sock.sendall(HEAD_START + b"x")
            slow.append(sock)
        latencies = [health_latency(capped) for _ in range(20)]
        assert max(latencies) < 1.0, latencies
        # The cap holds: the oldest connections still waiting for their head made room.
        assert open_connections(capped) <= MAX_CONNECTIONS
        slow[0].settimeout(5)
        assert read_until_closed(slow[0]) == b""  # closed long before its header timeout (10 s)


def test_when_every_connection_is_busy_a_new_one_gets_503_in_json(capped: Daemon) -> None:
    with ExitStack() as stack:
        feeds = []
        for _ in range(MAX_CONNECTIONS):  # a streaming request in flight each: none is idle
            sock = stack.enter_context(connect(capped))
            sock.sendall(b"GET /models/sse HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            feeds.append(sock)
        with connect(capped) as extra:
            raw = read_until_closed(extra)
        assert_json_error(raw, 503, "unavailable")
        assert "retry-after" in parse(raw)[1]
    capped.wait_until(lambda: open_connections(capped) == 0, "the feeds' connections closed", timeout=10)
    assert health_latency(capped) < 1.0
